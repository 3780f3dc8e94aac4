//! Parsing a compact JWS and checking its signature and time claims, with ESP's messages.
//!
//! We parse the token ourselves (rather than through `jsonwebtoken::decode`) because ESP's
//! `X-Endpoint-API-UserInfo` needs the payload in its original key order and because issuer
//! and audience are checked against per-method rules before any key is fetched.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use std::sync::Arc;

use super::keys::VerifyKey;

/// `exp`/`nbf` tolerance, as gRPC's claims checker used by ESP.
pub const CLOCK_SKEW_S: i64 = 60;

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
}

fn b64_part(part: &str) -> Option<Vec<u8>> {
    // Some issuers pad; the JWS spec says they should not, ESP accepted both.
    URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()
}

/// A numeric date claim; gRPC read these as numbers, so strings are malformed.
fn time_claim(payload: &Map<String, Value>, name: &str) -> Result<Option<i64>, String> {
    match payload.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| format!("Invalid {name} claim")),
        Some(_) => Err(format!("Invalid {name} claim")),
    }
}

/// Parses a token; the error is the text after `Bad JWT format: `.
pub fn parse(token: &str) -> Result<ParsedJwt, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("should have 2 dots".into());
    };
    let header_bytes = b64_part(h).ok_or("Invalid base64 in header")?;
    let header: Value =
        serde_json::from_slice(&header_bytes).map_err(|_| "Invalid JSON in header")?;
    let header = header.as_object().ok_or("Invalid JSON in header")?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("Missing alg in header")?;
    let alg: Algorithm = alg_name
        .parse()
        .map_err(|_| format!("Unsupported algorithm {alg_name}"))?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);

    let payload_bytes = b64_part(p).ok_or("Invalid base64 in payload")?;
    let payload: Value =
        serde_json::from_slice(&payload_bytes).map_err(|_| "Invalid JSON in payload")?;
    let Value::Object(payload) = payload else {
        return Err("Invalid JSON in payload".into());
    };
    let iss = match payload.get("iss") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("Missing or invalid iss claim".into()),
    };
    let (aud, aud_was_array) = match payload.get("aud") {
        None | Some(Value::Null) => (Vec::new(), false),
        Some(Value::String(s)) => (vec![s.clone()], false),
        Some(Value::Array(a)) => (
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            true,
        ),
        Some(_) => return Err("Invalid aud claim".into()),
    };
    let exp = time_claim(&payload, "exp")?;
    let nbf = time_claim(&payload, "nbf")?;
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
    })
}

impl ParsedJwt {
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
        assert_eq!(parse("abc").unwrap_err(), "should have 2 dots");
        assert_eq!(parse("a.b.c.d").unwrap_err(), "should have 2 dots");
        assert_eq!(parse("!!.b.c").unwrap_err(), "Invalid base64 in header");
        let bad_json = format!("{}.{}.sig", enc("{nope"), enc("{}"));
        assert_eq!(parse(&bad_json).unwrap_err(), "Invalid JSON in header");
        let no_iss = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256"}"#),
            enc(r#"{"sub":"x"}"#)
        );
        assert_eq!(parse(&no_iss).unwrap_err(), "Missing or invalid iss claim");
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
            enc(r#"{"iss":"i","aud":["a"],"exp":1,"nbf":0}"#)
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
