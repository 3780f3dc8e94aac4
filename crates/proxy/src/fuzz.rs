//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, excluded from the workspace), kept
//! here so that `cargo test` runs the same code over the checked-in seeds
//! (`tests/fuzz_seeds.rs`). Each takes arbitrary bytes and must return without panicking; the
//! assertions are invariants that hold for every input: [`jwt`] (the verifier) and
//! [`request_head`] (request line, headers, method override, key extraction, path
//! normalisation).

use crate::auth::{self, jwt, keys::KeySet, userinfo};
use crate::request_head;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use jsonwebtoken::Algorithm;
use std::sync::OnceLock;

/// The key set tokens are verified against: RSA (`rsa1`, RS256), EC P-256 (`ec1`, ES256),
/// Ed25519 (`ed1`, EdDSA) and an `oct` secret (`hs1`, HS256). Made, with the seed tokens they
/// sign, by `fuzz/make_jwt_seeds.py`.
pub const JWKS: &str = include_str!("fuzz_jwks.json");

/// The clock of the `jwt` target, so that seeds stay valid: 2023-11-14T22:13:20Z.
pub const NOW: i64 = 1_700_000_000;

fn keyset() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| KeySet::parse(JWKS.as_bytes()))
}

/// A client's token through the verifier, against [`JWKS`] at [`NOW`]; returns the outcome of
/// [`auth::verify_offline`]. Whatever parses also goes through the time check at extreme
/// clocks and the user-info builders, and the input as a key-set body through [`KeySet`].
pub fn jwt(data: &[u8]) -> Result<String, String> {
    let token = String::from_utf8_lossy(data);
    let outcome = auth::verify_offline(&token, keyset(), NOW);
    if let Ok(parsed) = jwt::parse(&token) {
        for now in [i64::MIN, -1, 0, NOW, i64::MAX] {
            let _ = parsed.check(now);
        }
        let audiences = userinfo::sorted_audiences(&parsed);
        let header = userinfo::user_info_header(&parsed, &audiences);
        assert!(
            http::HeaderValue::from_str(&header).is_ok(),
            "user info is not a header value: {header:?}"
        );
        let _ = userinfo::credential_id(&parsed.iss, &audiences);
        let _ = userinfo::jwt_payloads(
            &parsed.payload,
            &["sub".to_string(), "a.b".to_string(), "nested.a".to_string()],
        );
        let _ = auth::normalize(&parsed.iss);
    }
    let body = KeySet::parse(data);
    for alg in [
        Algorithm::RS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
        Algorithm::HS256,
    ] {
        let _ = body.candidates(Some("rsa1"), alg);
        let _ = body.candidates(None, alg);
    }
    outcome
}

/// Every [`request_head::PathOptions`] combination the flags can make.
const PATH_OPTIONS: [request_head::PathOptions; 8] = {
    let mut all = [request_head::PathOptions {
        normalize: false,
        merge_slashes: false,
        unescape_slashes: false,
    }; 8];
    let mut i = 0;
    while i < 8 {
        all[i] = request_head::PathOptions {
            normalize: i & 1 != 0,
            merge_slashes: i & 2 != 0,
            unescape_slashes: i & 4 != 0,
        };
        i += 1;
    }
    all
};

/// A client's request head (`METHOD target HTTP/1.1\r\nname: value\r\n...`), read the way hyper
/// hands it to the pipeline (lines that `http` would refuse are skipped, as hyper refuses them
/// before the proxy sees anything), then settled as [`crate::pipeline`] settles it, with every
/// combination of `--underscores_in_headers`, ESPv2's head rules (names with `_` refused,
/// `X-Forwarded-Client-Cert` removed) and the path flags. Checks what docs/security.md
/// promises: the method is an upper-case token and never CONNECT or TRACE; no header the proxy
/// owns, and no `_` header without the flag, survives; a normalised path is absolute, holds no
/// dot segment, no repeated slash (when merging), no `%00`, and normalising it again changes
/// nothing; the query is kept byte for byte; the API key found is a slice of the request.
///
/// Returns, for the default flags, `METHOD target` as settled or the refusal's text; `None` when
/// the bytes are not a request head hyper would pass on.
pub fn request_head(data: &[u8]) -> Option<Result<String, String>> {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(3, ' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return None;
    };
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let uri = target.parse::<http::Uri>().ok()?;
    let mut headers = HeaderMap::new();
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.trim_matches([' ', '\t']).as_bytes()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let raw_target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let limits = crate::settings::HeaderLimits::default();
    let mut req = http::Request::new(());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    let _ = crate::limits::head_line_error(&req, &limits);

    let mut outcome = None;
    let had_underscore = headers.keys().any(|n| n.as_str().contains('_'));
    // `espv2`: names with `_` refused rather than dropped, `X-Forwarded-Client-Cert` removed.
    for (underscores_in_headers, espv2) in
        [(false, false), (true, false), (false, true), (true, true)]
    {
        for path in PATH_OPTIONS {
            let mut h = headers.clone();
            let opts = request_head::HeadOptions {
                underscores_in_headers,
                refuse_underscores: espv2,
                sanitize_client_cert: espv2,
                path,
                generated_prefix: espv2.then_some("x-apigateway-api-"),
            };
            let framing = request_head::Framing {
                version: http::Version::HTTP_11,
                has_authority: uri.authority().is_some(),
            };
            let settled = request_head::settle(&method, framing, &mut h, raw_target, opts);
            if espv2 && !underscores_in_headers && had_underscore {
                assert!(
                    matches!(
                        settled,
                        Err(request_head::HeadError::UnderscoreInName { .. })
                    ),
                    "a name with '_' was not refused: {settled:?}"
                );
            }
            if !underscores_in_headers && !espv2 && path == request_head::PathOptions::default() {
                outcome = Some(match &settled {
                    Ok(s) => Ok(format!("{} {}", s.method, s.target.text)),
                    Err(e) => Err(e.to_string()),
                });
            }
            for name in h.keys() {
                let n = name.as_str().as_bytes();
                assert!(!request_head::is_proxy_owned(n), "{name} survived");
                assert!(
                    !espv2
                        || !n
                            .iter()
                            .map(|c| if *c == b'_' { b'-' } else { *c })
                            .take(17)
                            .eq(b"x-apigateway-api-".iter().copied()),
                    "{name} survived"
                );
                assert!(
                    underscores_in_headers || !n.contains(&b'_'),
                    "{name} survived"
                );
                assert!(
                    !espv2
                        || !n
                            .iter()
                            .map(|c| if *c == b'_' {
                                b'-'
                            } else {
                                c.to_ascii_lowercase()
                            })
                            .eq(b"x-forwarded-client-cert".iter().copied()),
                    "{name} survived"
                );
            }
            let Ok(settled) = settled else { continue };
            let m = settled.method.as_str();
            assert!(
                request_head::is_upper_case_token(m.as_bytes()),
                "method {m:?}"
            );
            assert!(m != "CONNECT" && m != "TRACE", "method {m:?}");
            let t: &str = &settled.target.text;
            let (p, q) = (
                request_head::path_of(t),
                &t[request_head::path_of(t).len()..],
            );
            assert_eq!(
                q,
                &raw_target[request_head::path_of(raw_target).len()..],
                "query changed"
            );
            if path.normalize {
                assert!(p.starts_with('/'), "not absolute: {p:?}");
                for seg in p.split('/').skip(1) {
                    assert!(seg != "." && seg != "..", "dot segment left in {p:?}");
                }
                assert!(!p.to_ascii_lowercase().contains("%00"), "NUL left in {p:?}");
                if path.merge_slashes {
                    assert!(!p.contains("//"), "repeated slash left in {p:?}");
                }
                let again = request_head::normalize_target(t, path);
                let again = again.map(|n| n.text.into_owned());
                assert_eq!(again.as_deref(), Ok(t), "not idempotent");
            }
            let query = t.split_once('?').map(|(_, q)| q);
            let loc = crate::auth::api_key::ApiKeyLocations::esp_default();
            if let Some(key) = crate::auth::api_key::extract_api_key(query, &h, &loc) {
                assert!(!key.is_empty());
                assert!(
                    t.contains(key) || h.values().any(|v| v.as_bytes() == key.as_bytes()),
                    "key {key:?} is not from the request"
                );
            }
        }
    }
    outcome
}
