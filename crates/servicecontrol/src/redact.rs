//! Masking credentials in URLs and log text: the one rule both the proxy (access log, report)
//! and the control plane (stored request logs) apply.
//!
//! A *secret parameter* is a `name=value` pair whose name is one of ESP's default credential
//! names (`key`, `api_key`, `access_token`) or one the service config adds (the
//! `url_query_parameter` of an `api_key` system parameter, the `query` of a provider's
//! `jwtLocations`). Names are compared after the normalisation backends apply when they read
//! them — percent-decoding (up to three rounds), `+` as a space, Unicode lower-casing, a PHP
//! array suffix (`key[]`) and PHP's `.`/space → `_` — because the proxy accepts `?KEY=` like
//! nginx's `$arg_` and a backend may accept `?%6Bey=` or `?api.key=`: whoever reads the logs
//! must not learn a credential any of them would honour.
//!
//! Where a pair may start: after `?`, `&`, `;` or `#` anywhere in the text (query, `;`
//! separators, path parameters, fragments, and URLs quoted inside free text). Its value runs
//! to the next `&` or whitespace — past `;`, `?` and `#`, because the proxy's own query lookup
//! splits on `&` only and would take `?key=a;b#c` as the key `a;b#c`. Masking more than the
//! secret is the safe error.
//!
//! The value becomes `…` plus its last four characters when it is longer than eight (enough
//! to tell keys apart), else a bare `…`. A value that already looks masked is kept, so
//! masking twice (proxy, then control plane) gives the same text.

use std::borrow::Cow;

use portico_config::Service;

/// ESP's default API-key query names and the default JWT query parameter.
pub const DEFAULT_SECRET_PARAMS: [&str; 3] = ["key", "api_key", "access_token"];

/// What a masked value starts with.
pub const MASK: char = '…';

/// How many trailing characters of a long secret stay visible.
const KEEP: usize = 4;
/// Secrets up to this many characters are masked whole.
const SHORT: usize = 8;

/// Bytes after which a parameter name may start.
fn starts_param(b: u8) -> bool {
    matches!(b, b'?' | b'&' | b';' | b'#')
}

/// The set of query-parameter names whose values are credentials, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretParams {
    /// Normalised names, sorted, without duplicates.
    names: Vec<String>,
}

impl Default for SecretParams {
    fn default() -> Self {
        SecretParams::new(std::iter::empty::<&str>())
    }
}

impl SecretParams {
    /// The defaults plus `extra` names (as written in a config).
    pub fn new<I, S>(extra: I) -> SecretParams
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut names: Vec<String> = DEFAULT_SECRET_PARAMS
            .iter()
            .map(|n| normalise_name(n))
            .chain(extra.into_iter().map(|n| normalise_name(n.as_ref())))
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        SecretParams { names }
    }

    /// The defaults plus every query name the service config reads a credential from.
    pub fn for_service(service: &Service) -> SecretParams {
        let api_keys = service
            .system_parameters
            .iter()
            .flat_map(|sp| sp.rules.iter())
            .flat_map(|r| r.parameters.iter())
            .filter(|p| p.name == "api_key")
            .map(|p| p.url_query_parameter.as_str());
        let jwts = service
            .authentication
            .iter()
            .flat_map(|a| a.providers.iter())
            .flat_map(|p| p.jwt_locations.iter())
            .map(|l| l.query.as_str());
        SecretParams::new(api_keys.chain(jwts).filter(|n| !n.is_empty()))
    }

    /// Adds the names of `other`.
    pub fn extend(&mut self, other: &SecretParams) {
        if self.covers(other) {
            return;
        }
        self.names.extend(other.names.iter().cloned());
        self.names.sort();
        self.names.dedup();
    }

    /// Whether every name of `other` is in this set.
    pub fn covers(&self, other: &SecretParams) -> bool {
        other
            .names
            .iter()
            .all(|n| self.names.binary_search(n).is_ok())
    }

    /// The normalised names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether a raw (as sent, possibly encoded) parameter name names a credential.
    pub fn is_secret_name(&self, raw: &str) -> bool {
        // Most names are plain tokens; they need no allocation.
        if raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return self.names.iter().any(|n| n.eq_ignore_ascii_case(raw));
        }
        let n = normalise_name(raw);
        self.names.binary_search(&n).is_ok()
    }

    /// `text` with the value of every secret parameter masked (see the module docs).
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let b = text.as_bytes();
        let mut out: Option<String> = None;
        let mut copied = 0;
        let mut i = 0;
        while i < b.len() {
            if !starts_param(b[i]) {
                i += 1;
                continue;
            }
            let name_start = i + 1;
            let mut j = name_start;
            // (end of the name, start of the value); `%3D` counts as `=` for decoding backends.
            let mut eq = None;
            while j < b.len() {
                let c = b[j];
                if c == b'=' {
                    eq = Some((j, j + 1));
                    break;
                }
                if c == b'%'
                    && b.get(j + 1) == Some(&b'3')
                    && b.get(j + 2).map(|c| c | 0x20) == Some(b'd')
                {
                    eq = Some((j, j + 3));
                    break;
                }
                if starts_param(c) || c.is_ascii_whitespace() {
                    break;
                }
                j += 1;
            }
            let Some((name_end, value_start)) = eq else {
                i = j;
                continue;
            };
            if name_end == name_start || !self.is_secret_name(&text[name_start..name_end]) {
                // The value may itself hold `;key=...` or `?key=...`: keep scanning inside it.
                i = value_start;
                continue;
            }
            let mut k = value_start;
            while k < b.len() && b[k] != b'&' && !b[k].is_ascii_whitespace() {
                k += 1;
            }
            let value = &text[value_start..k];
            let masked = mask_value(value);
            if masked != value {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                o.push_str(&text[copied..value_start]);
                o.push_str(&masked);
                copied = k;
            }
            i = k;
        }
        match out {
            None => Cow::Borrowed(text),
            Some(mut o) => {
                o.push_str(&text[copied..]);
                Cow::Owned(o)
            }
        }
    }
}

/// A credential value as it may be shown: `…` and the last four characters of a value longer
/// than eight, else `…`; empty stays empty and an already-masked value is kept.
pub fn mask_value(v: &str) -> String {
    if v.is_empty() {
        return String::new();
    }
    let n = v.chars().count();
    if v.starts_with(MASK) && n <= KEEP + 1 {
        return v.to_string();
    }
    let mut out = String::with_capacity(MASK.len_utf8() + 4 * KEEP);
    out.push(MASK);
    if n > SHORT {
        out.extend(v.chars().skip(n - KEEP));
    }
    out
}

/// A parameter name the way lenient backends read it (see the module docs).
fn normalise_name(raw: &str) -> String {
    let mut s = raw.replace('+', " ");
    for _ in 0..3 {
        if !s.contains('%') {
            break;
        }
        let decoded = percent_decode(&s);
        if decoded == s {
            break;
        }
        s = decoded;
    }
    // C backends stop at NUL; PHP drops `[...]` array suffixes.
    let s = s.split(['\0', '[']).next().unwrap_or_default();
    let s = s.trim_matches(|c: char| c.is_whitespace() || c.is_control());
    s.chars()
        .map(|c| if c == '.' || c == ' ' { '_' } else { c })
        .collect::<String>()
        .to_lowercase()
}

/// `%XX` decoding; malformed escapes stay as they are, invalid UTF-8 becomes U+FFFD.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AIzaSyD-0123456789abcdefghijklmnopqrstu";

    fn redact(s: &str) -> String {
        SecretParams::default().redact(s).into_owned()
    }

    #[test]
    fn masks_keep_four_characters_of_long_values_only() {
        assert_eq!(mask_value(KEY), "…rstu");
        assert_eq!(mask_value("12345678"), "…");
        assert_eq!(mask_value("123456789"), "…6789");
        assert_eq!(mask_value(""), "");
        assert_eq!(mask_value("ééééééééé"), "…éééé");
        // Idempotent: the control plane masks what the proxy already masked.
        assert_eq!(mask_value(&mask_value(KEY)), "…rstu");
        assert_eq!(mask_value("…"), "…");
        assert_eq!(mask_value("…abcdefghij"), "…ghij");
    }

    #[test]
    fn default_names_in_any_case() {
        for name in [
            "key",
            "KEY",
            "Key",
            "api_key",
            "Api_Key",
            "API_KEY",
            "access_token",
            "Access_Token",
        ] {
            let url = format!("/a?x=1&{name}={KEY}&y=2");
            assert_eq!(redact(&url), format!("/a?x=1&{name}=…rstu&y=2"), "{name}");
        }
        assert_eq!(
            redact("/a?keyring=1&k=2&monkey=3"),
            "/a?keyring=1&k=2&monkey=3"
        );
        assert_eq!(redact("/plain/path"), "/plain/path");
        assert!(matches!(
            SecretParams::default().redact("/a?b=c"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn encoded_and_decorated_names() {
        for name in [
            "%6Bey",
            "%6bEY",
            "%256Bey",
            "k%65y",
            "api%5Fkey",
            "api.key",
            "api+key",
            "api%20key",
            "key[]",
            "key%5B0%5D",
            "%20key",
            "key%00junk",
            "access%5Ftoken",
            "\u{212A}ey", // Kelvin sign, lower-cases to `k`
        ] {
            let url = format!("/a?{name}={KEY}");
            assert_eq!(redact(&url), format!("/a?{name}=…rstu"), "{name}");
        }
        // An encoded `=` separates name and value for backends that decode first.
        assert_eq!(redact(&format!("/a?key%3D{KEY}")), "/a?key%3D…rstu");
        assert_eq!(redact(&format!("/a?key%3d{KEY}&b=1")), "/a?key%3d…rstu&b=1");
    }

    #[test]
    fn repeated_separators_fragments_and_nesting() {
        assert_eq!(
            redact(&format!("/a?key={KEY}&key={KEY}x")),
            "/a?key=…rstu&key=…stux"
        );
        assert_eq!(redact(&format!("/a?x=1;key={KEY}")), "/a?x=1;key=…rstu");
        // The value runs to `&`, past `;` and `#`, as the proxy's own lookup reads it.
        assert_eq!(redact(&format!("/a?key={KEY};x=1")), "/a?key=…;x=1");
        assert_eq!(redact(&format!("/a?key=ab#{KEY}")), "/a?key=…rstu");
        assert_eq!(
            redact(&format!("/cb#state=1&access_token={KEY}")),
            "/cb#state=1&access_token=…rstu"
        );
        assert_eq!(
            redact(&format!("/a#access_token={KEY}")),
            "/a#access_token=…rstu"
        );
        // A path parameter's value runs on too.
        assert_eq!(redact(&format!("/a;key={KEY}/b")), "/a;key=…tu/b");
        // A secret inside another parameter's value.
        assert_eq!(
            redact(&format!("/a?next=/b?key={KEY}")),
            "/a?next=/b?key=…rstu"
        );
        assert_eq!(
            redact(&format!("/a?next=x;api_key={KEY}&k=1")),
            "/a?next=x;api_key=…rstu&k=1"
        );
        // Empty and valueless.
        assert_eq!(redact("/a?key=&key&=key"), "/a?key=&key&=key");
    }

    #[test]
    fn free_text_with_urls() {
        assert_eq!(
            redact(&format!(
                "Endpoints management skipped for an unrecognized HTTP call: GET /x?key={KEY} rest"
            )),
            "Endpoints management skipped for an unrecognized HTTP call: GET /x?key=…rstu rest"
        );
        assert_eq!(
            redact(&format!("invalid request target \"/x?access_token={KEY}\"")),
            "invalid request target \"/x?access_token=…stu\""
        );
    }

    /// The table in docs/security.md ("Secrets"), kept true.
    #[test]
    fn documented_examples() {
        let p = SecretParams::new(["mykey"]);
        for (url, logged) in [
            (format!("/v1/x?KEY={KEY}&page=2"), "/v1/x?KEY=…rstu&page=2"),
            (format!("/v1/x?%6Bey={KEY}"), "/v1/x?%6Bey=…rstu"),
            ("/v1/x?a=1;api_key=abc".into(), "/v1/x?a=1;api_key=…"),
            ("/v1/x?key=abc;def&b=2".into(), "/v1/x?key=…&b=2"),
            (
                "/cb#state=s&access_token=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJpIn0.c2lnbmF0dXJl".into(),
                "/cb#state=s&access_token=…dXJl",
            ),
            (format!("/v1/x?MyKey={KEY}"), "/v1/x?MyKey=…rstu"),
        ] {
            assert_eq!(p.redact(&url), logged);
        }
    }

    #[test]
    fn config_names_are_added() {
        let p = SecretParams::new(["MyKey", "jwt", "tok.en"]);
        assert_eq!(
            p.names(),
            ["access_token", "api_key", "jwt", "key", "mykey", "tok_en"]
        );
        assert_eq!(
            p.redact(&format!("/a?mykey={KEY}&JWT={KEY}&tok_en=abc&other=1")),
            "/a?mykey=…rstu&JWT=…rstu&tok_en=…&other=1"
        );
        assert!(!SecretParams::default().is_secret_name("mykey"));
        let mut d = SecretParams::default();
        assert!(p.covers(&d));
        assert!(!d.covers(&p));
        d.extend(&p);
        assert_eq!(d, p);
    }

    #[test]
    fn from_a_service_config() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "name": "s",
            "systemParameters": {"rules": [{"selector": "*", "parameters": [
                {"name": "api_key", "urlQueryParameter": "apiKey", "httpHeader": "x-k"},
                {"name": "other", "urlQueryParameter": "notsecret"}
            ]}]},
            "authentication": {"providers": [{"id": "p", "issuer": "i",
                "jwtLocations": [{"query": "jwt_param"}, {"header": "h"}]}]}
        }))
        .unwrap();
        let p = SecretParams::for_service(&svc);
        assert_eq!(
            p.names(),
            ["access_token", "api_key", "apikey", "jwt_param", "key"]
        );
    }

    /// Whatever the input, redaction never panics, never grows a secret and is idempotent.
    #[test]
    fn arbitrary_inputs() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let alphabet: Vec<char> = "kKeyapi_%36Bb3dD=&;#?/ +.[]\u{212A}é…x\0\t"
            .chars()
            .collect();
        let p = SecretParams::new(["mykey"]);
        for seed in 0..20_000u64 {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            let mut state = h.finish();
            let len = (state % 40) as usize;
            let mut s = String::new();
            for _ in 0..len {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push(alphabet[(state >> 33) as usize % alphabet.len()]);
            }
            let once = p.redact(&s).into_owned();
            assert_eq!(p.redact(&once), once, "{s:?}");
        }
    }
}
