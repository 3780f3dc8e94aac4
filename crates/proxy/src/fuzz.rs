//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, excluded from the workspace), kept
//! here so that `cargo test` runs the same code over the checked-in seeds
//! (`tests/fuzz_seeds.rs`). Each takes arbitrary bytes and must return without panicking; the
//! assertions are invariants that hold for every input. `request_head` (request line, headers,
//! method override, key extraction, path normalisation) is to join [`jwt`] here.

use crate::auth::{self, jwt, keys::KeySet, userinfo};
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
