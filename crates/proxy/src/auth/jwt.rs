//! Parsing a compact JWS and checking its signature and time claims, with ESP's messages.
//!
//! We parse the token ourselves (rather than through `jsonwebtoken::decode`) because ESP's
//! `X-Endpoint-API-UserInfo` needs the payload in its original key order and because issuer
//! and audience are checked against per-method rules before any key is fetched.
//!
//! ESP's order, which decides which message a doubly-broken token gets: header (base64, JSON,
//! `alg`) → claims (base64, JSON, claim types, `iss`) → `exp`/`nbf` → signature encoding →
//! `aud` and `sub` present ([`parse`] does the first two, [`ParsedJwt::check`] the rest); the
//! caller then checks issuer and audience rules, finds keys and verifies the signature.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use std::sync::Arc;

use super::keys::VerifyKey;

/// `exp`/`nbf` tolerance, as gRPC's claims checker used by ESP.
pub const CLOCK_SKEW_S: i64 = 60;

/// ESP's message for claims of the wrong JSON type.
const BAD_CLAIM_TYPES: &str =
    "Bad JWT format: invalid JWT claims; e.g. wrong data type, iss is not a string.";
/// ESP's message for a token without `iss` (its spelling, kept for byte-compatibility).
const MISSING_ISS: &str = "Bad JWT format: invalid JWT claims; issuer is mssing but required.";
/// The reason for a token outside its `exp`/`nbf` window.
pub const TIME_CONSTRAINT_FAILURE: &str = "TIME_CONSTRAINT_FAILURE";

/// A structurally valid token, not yet verified.
#[derive(Debug, Clone)]
pub struct ParsedJwt {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// The payload object in its original key order.
    pub payload: Arc<Map<String, Value>>,
    pub iss: String,
    /// `aud` as given: one string or an array (non-strings ignored).
    pub aud: Vec<String>,
    pub aud_was_array: bool,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    /// Byte offset of the second `.`: `token[..signing_input_len]` is what was signed.
    signing_input_len: usize,
    /// What is wrong with the signature's encoding, reported after the time check.
    signature_problem: Option<&'static str>,
}

fn b64_part(part: &str) -> Option<Vec<u8>> {
    // Some issuers pad; the JWS spec says they should not, ESP accepted both.
    URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()
}

/// A numeric date claim, read as gRPC's claims parser (ESP v1's) reads it.
///
/// Absent is fine: ESP v1 takes a missing `exp` as "never expires" (and a missing `nbf`/`iat`
/// as "always"), so a token without `exp` is accepted; ESPv2 (Envoy `jwt_authn`, whose
/// `require_expiration` it never sets) accepts it too. A value that is not a number, or whose
/// whole seconds are 0 (`0`, `0.5`, `-0.2`), is a malformed claim: gRPC keeps the seconds
/// (`strtol`) and treats 0 as its parse-failure marker. Fractions are truncated towards zero,
/// as `strtol` does; unlike `strtol` we read exponent notation by value (`1e9` is 10^9 s, not
/// 1 s) — no issuer writes it.
fn time_claim(payload: &Map<String, Value>, name: &str) -> Result<Option<i64>, String> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)) {
            Some(0) | None => Err(BAD_CLAIM_TYPES.to_string()),
            Some(secs) => Ok(Some(secs)),
        },
        Some(_) => Err(BAD_CLAIM_TYPES.to_string()),
    }
}

/// Parses a token up to (and including) its `iss`; the error is the complete reason that
/// follows `JWT validation failed: `.
pub fn parse(token: &str) -> Result<ParsedJwt, String> {
    // Like ESP, split at the first two dots; extra dots end up in the signature, whose
    // encoding is then invalid.
    let mut parts = token.splitn(3, '.');
    let (Some(h), Some(p), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("Bad JWT format: should have 2 dots".into());
    };
    let header_bytes = b64_part(h).ok_or("Bad JWT format: Invalid base64 in header")?;
    let header: Value = serde_json::from_slice(&header_bytes)
        .map_err(|_| "Bad JWT format: Invalid JSON in header")?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("Missing alg field.")?;
    let alg: Algorithm = alg_name
        .parse()
        .map_err(|_| format!("Bad JWT format: unsupported alg {alg_name}"))?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);

    let payload_bytes = b64_part(p).ok_or("Bad JWT format: Invalid base64 in claims")?;
    let payload: Value = serde_json::from_slice(&payload_bytes)
        .map_err(|_| "Bad JWT format: Invalid JSON in claims")?;
    let Value::Object(payload) = payload else {
        return Err(BAD_CLAIM_TYPES.into());
    };
    for name in ["iss", "sub", "jti"] {
        if payload.get(name).is_some_and(|v| !v.is_string()) {
            return Err(BAD_CLAIM_TYPES.into());
        }
    }
    let (aud, aud_was_array) = match payload.get("aud") {
        None => (Vec::new(), false),
        Some(Value::String(s)) => (vec![s.clone()], false),
        Some(Value::Array(a)) => (
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            true,
        ),
        Some(_) => return Err(BAD_CLAIM_TYPES.into()),
    };
    let exp = time_claim(&payload, "exp")?;
    let nbf = time_claim(&payload, "nbf")?;
    time_claim(&payload, "iat")?;
    let iss = match payload.get("iss") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(MISSING_ISS.into()),
    };
    let signature_problem = match b64_part(sig) {
        Some(bytes) if !bytes.is_empty() => (alg == Algorithm::ES256 && bytes.len() != 64)
            .then_some("Bad JWT format: signature length is not correct"),
        _ => Some("Bad JWT format: invalid base64 for signature"),
    };
    Ok(ParsedJwt {
        alg,
        kid,
        iss,
        aud,
        aud_was_array,
        exp,
        nbf,
        payload: Arc::new(payload),
        signing_input_len: h.len() + 1 + p.len(),
        signature_problem,
    })
}

impl ParsedJwt {
    /// The rest of ESP's parse, at `now`: time window, signature encoding, then the claims the
    /// user info needs (`aud`, `sub`). The error is the complete reason.
    pub fn check(&self, now: i64) -> Result<(), &'static str> {
        if !self.time_valid(now) {
            return Err(TIME_CONSTRAINT_FAILURE);
        }
        if let Some(problem) = self.signature_problem {
            return Err(problem);
        }
        if self.aud.is_empty() {
            return Err("Bad JWT format: missing audience field.");
        }
        if !self.payload.contains_key("sub") {
            return Err("Bad JWT format: missing subject field.");
        }
        Ok(())
    }

    /// Whether `exp`/`nbf` hold at `now` (unix seconds), with the skew.
    pub fn time_valid(&self, now: i64) -> bool {
        if self
            .exp
            .is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_S))
        {
            return false;
        }
        if self
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(CLOCK_SKEW_S))
        {
            return false;
        }
        true
    }

    /// Checks the signature against the candidates; true if any verifies.
    pub fn signature_valid(&self, token: &str, keys: &[&VerifyKey]) -> bool {
        let Some(message) = token.get(..self.signing_input_len) else {
            return false;
        };
        let Some(signature) = token.get(self.signing_input_len + 1..) else {
            return false;
        };
        // jsonwebtoken expects the signature without padding.
        let signature = signature.trim_end_matches('=');
        keys.iter().any(|k| {
            jsonwebtoken::crypto::verify(signature, message.as_bytes(), &k.key, self.alg)
                .unwrap_or(false)
        })
    }
}

/// Compact JSON as gRPC's writer (which ESP used) prints it: no whitespace, `/` unescaped,
/// non-ASCII characters as `\uXXXX` escapes (UTF-16, surrogate pairs).
pub fn write_compact(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_compact(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_compact(x, out);
            }
            out.push('}');
        }
    }
}

pub fn write_string(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn format_errors_name_the_problem() {
        let h = enc(r#"{"alg":"RS256"}"#);
        let t = |header: &str, claims: &str| format!("{header}.{}.c2ln", enc(claims));
        assert_eq!(
            parse("abc").unwrap_err(),
            "Bad JWT format: should have 2 dots"
        );
        assert_eq!(
            parse("a.b").unwrap_err(),
            "Bad JWT format: should have 2 dots"
        );
        assert_eq!(
            parse("!!.b.c").unwrap_err(),
            "Bad JWT format: Invalid base64 in header"
        );
        let bad_json = format!("{}.{}.sig", enc("{nope"), enc("{}"));
        assert_eq!(
            parse(&bad_json).unwrap_err(),
            "Bad JWT format: Invalid JSON in header"
        );
        assert_eq!(
            parse(&t(&enc("{}"), "{}")).unwrap_err(),
            "Missing alg field."
        );
        assert_eq!(
            parse(&format!("{h}.!!.c2ln")).unwrap_err(),
            "Bad JWT format: Invalid base64 in claims"
        );
        assert_eq!(
            parse(&t(&h, "{x")).unwrap_err(),
            "Bad JWT format: Invalid JSON in claims"
        );
        assert_eq!(parse(&t(&h, r#"{"sub":"x"}"#)).unwrap_err(), MISSING_ISS);
        for bad in [
            r#"{"iss":1}"#,
            r#"{"iss":"i","exp":"1"}"#,
            r#"{"iss":"i","aud":{}}"#,
            "[1]",
        ] {
            assert_eq!(parse(&t(&h, bad)).unwrap_err(), BAD_CLAIM_TYPES, "{bad}");
        }
        let ok = r#"{"iss":"i","sub":"s","aud":"a","exp":100}"#;
        assert!(parse(&t(&h, ok)).unwrap().check(100).is_ok());
        // Extra dots land in the signature, which is then not base64.
        let dotted = format!("{}.{}.c2ln.ZA", h, enc(ok));
        assert_eq!(
            parse(&dotted).unwrap().check(100).unwrap_err(),
            "Bad JWT format: invalid base64 for signature"
        );
        // The time window is judged before the signature's encoding.
        assert_eq!(
            parse(&dotted).unwrap().check(1_000).unwrap_err(),
            TIME_CONSTRAINT_FAILURE
        );
        let es = format!("{}.{}.c2ln", enc(r#"{"alg":"ES256"}"#), enc(ok));
        assert_eq!(
            parse(&es).unwrap().check(100).unwrap_err(),
            "Bad JWT format: signature length is not correct"
        );
        assert_eq!(
            parse(&t(&h, r#"{"iss":"i","sub":"s"}"#))
                .unwrap()
                .check(0)
                .unwrap_err(),
            "Bad JWT format: missing audience field."
        );
        assert_eq!(
            parse(&t(&h, r#"{"iss":"i","aud":["a"]}"#))
                .unwrap()
                .check(0)
                .unwrap_err(),
            "Bad JWT format: missing subject field."
        );
    }

    /// ESP v1 accepts a token without `exp` (gRPC's claims default to "never expires") and
    /// refuses a time claim whose seconds are 0 as a malformed claim.
    #[test]
    fn time_claims_follow_esp() {
        let h = enc(r#"{"alg":"RS256"}"#);
        let t = |claims: &str| format!("{h}.{}.c2ln", enc(claims));
        let no_exp = parse(&t(r#"{"iss":"i","sub":"s","aud":"a"}"#)).unwrap();
        assert_eq!(no_exp.exp, None);
        for now in [0, 1_700_000_000, 4_102_444_800, i64::MAX] {
            assert_eq!(no_exp.check(now), Ok(()), "at {now}");
        }
        for zero in [
            r#"{"iss":"i","sub":"s","aud":"a","exp":0}"#,
            r#"{"iss":"i","sub":"s","aud":"a","exp":0.9}"#,
            r#"{"iss":"i","sub":"s","aud":"a","exp":-0.5}"#,
            r#"{"iss":"i","sub":"s","aud":"a","nbf":0}"#,
            r#"{"iss":"i","sub":"s","aud":"a","iat":0}"#,
        ] {
            assert_eq!(parse(&t(zero)).unwrap_err(), BAD_CLAIM_TYPES, "{zero}");
        }
        // Fractions are truncated, huge values saturate.
        let frac = parse(&t(r#"{"iss":"i","sub":"s","aud":"a","exp":100.9}"#)).unwrap();
        assert_eq!(frac.exp, Some(100));
        let huge = parse(&t(r#"{"iss":"i","sub":"s","aud":"a","exp":1e300}"#)).unwrap();
        assert_eq!(huge.exp, Some(i64::MAX));
        assert_eq!(huge.check(i64::MAX), Ok(()));
        let neg = parse(&t(r#"{"iss":"i","sub":"s","aud":"a","exp":-5}"#)).unwrap();
        assert_eq!(neg.check(56), Err(TIME_CONSTRAINT_FAILURE));
    }

    #[test]
    fn payload_keeps_key_order_and_array_aud() {
        let t = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"ES256","kid":"k1"}"#),
            enc(r#"{"z":1,"iss":"i","aud":["b","a"],"exp":10,"nbf":5}"#)
        );
        let p = parse(&t).unwrap();
        assert_eq!(p.alg, Algorithm::ES256);
        assert_eq!(p.kid.as_deref(), Some("k1"));
        assert_eq!(
            p.payload.keys().collect::<Vec<_>>(),
            ["z", "iss", "aud", "exp", "nbf"]
        );
        assert!(p.aud_was_array);
        assert_eq!(p.aud, ["b", "a"]);
        assert!(p.time_valid(70));
        assert!(!p.time_valid(71));
        assert!(!p.time_valid(-56));
        assert!(p.time_valid(-55));
    }

    #[test]
    fn compact_writer_escapes_like_grpc() {
        let mut out = String::new();
        write_compact(
            &serde_json::json!({"a/b": "é\u{1F600}\"\n", "n": [1, 2.5, true, null]}),
            &mut out,
        );
        assert_eq!(
            out,
            r#"{"a/b":"\u00e9\ud83d\ude00\"\n","n":[1,2.5,true,null]}"#
        );
    }

    /// Tokens come straight from clients: random and mutated inputs must never panic.
    #[test]
    fn mangled_tokens_never_panic() {
        use rand::{Rng as _, SeedableRng as _};
        let good = format!(
            "{}.{}.c2ln",
            enc(r#"{"alg":"RS256","kid":"k"}"#),
            enc(r#"{"iss":"i","aud":["a"],"exp":1,"nbf":1}"#)
        );
        assert!(parse(&good).is_ok());
        let alphabet = b"abcXYZ019-_.=+/ \"{}:,[]\\\xc3\xa9";
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..5_000 {
            let mut bytes = good.clone().into_bytes();
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = alphabet[rng.gen_range(0..alphabet.len())];
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(p) = parse(&text) {
                let _ = p.time_valid(0);
                let _ = p.signature_valid(&text, &[]);
            }
        }
    }
}
