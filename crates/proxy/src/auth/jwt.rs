//! Parsing a compact JWS and checking its signature and time claims, with ESP's messages.
//!
//! We parse the token ourselves (rather than through `jsonwebtoken::decode`) because ESP's
//! `X-Endpoint-API-UserInfo` needs the payload in its original key order and because issuer
//! and audience are checked against per-method rules before any key is fetched.
//!
//! ESP's order, which decides which message a doubly-broken token gets: empty → first dot →
//! header (base64, JSON, `alg`) → second dot → claims (base64, JSON, claim types, `iss`) →
//! `exp`/`nbf` → an email issuer's `sub` → signature encoding → `aud` present ([`parse`] does the first two, [`ParsedJwt::check`] the rest); the
//! caller then checks issuer and audience rules, finds keys and verifies the signature.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use std::sync::Arc;

use super::keys::VerifyKey;
use crate::error::JwtProblem;
use std::borrow::Cow;

/// `exp`/`nbf` tolerance, as gRPC's claims checker used by ESP.
pub const CLOCK_SKEW_S: i64 = 60;

/// ESP's message for claims of the wrong JSON type.
const BAD_CLAIM_TYPES: &str =
    "Bad JWT format: invalid JWT claims; e.g. wrong data type, iss is not a string.";
/// ESP's message for a token without `iss` (its spelling, kept for byte-compatibility).
const MISSING_ISS: &str = "Bad JWT format: invalid JWT claims; issuer is mssing but required.";
/// The reason for a token outside its `exp`/`nbf` window.
pub const TIME_CONSTRAINT_FAILURE: &str = "TIME_CONSTRAINT_FAILURE";
/// The reason for an email-address issuer asserting another subject (gRPC's unnamed status).
pub const BAD_SUBJECT: &str = "UNKNOWN";

/// Why a token was refused: ESP v1's reason (what follows `JWT validation failed: `) and the
/// same failure in ESPv2's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadJwt {
    pub reason: Cow<'static, str>,
    pub problem: JwtProblem,
}

impl BadJwt {
    fn new(reason: impl Into<Cow<'static, str>>, problem: JwtProblem) -> BadJwt {
        BadJwt {
            reason: reason.into(),
            problem,
        }
    }
}

impl std::fmt::Display for BadJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl PartialEq<&str> for BadJwt {
    fn eq(&self, other: &&str) -> bool {
        self.reason == *other
    }
}

/// Whether a token has the three dot-separated sections of a compact JWS. ESPv2's verifier
/// refuses any other shape first; ESP v1 reads the header before it counts dots.
pub fn three_sections(token: &str) -> bool {
    token.split('.').count() == 3
}

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
    /// Byte offset of the payload segment (just after the first `.`).
    payload_start: usize,
    /// The signature's bytes (empty when its encoding is invalid).
    signature: Vec<u8>,
    /// An email-address issuer naming another subject, reported after the time check.
    subject_problem: bool,
    /// What is wrong with the signature's encoding, reported after the subject check.
    signature_problem: Option<(&'static str, JwtProblem)>,
}

/// `=` inside a group, as gRPC's decoder marks it.
const PAD: u8 = 0x7f;

fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        b'=' => Some(PAD),
        _ => None,
    }
}

fn decode_group(g: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let one = |a: u8, b: u8, out: &mut Vec<u8>| {
        out.push(((u32::from(a) << 2) | (u32::from(b) >> 4)) as u8)
    };
    let two = |a: u8, b: u8, c: u8, out: &mut Vec<u8>| {
        let packed = (u32::from(a) << 10) | (u32::from(b) << 4) | (u32::from(c) >> 2);
        out.push((packed >> 8) as u8);
        out.push(packed as u8);
    };
    match *g {
        [a, b] => one(a, b, out),
        [a, b, c] => two(a, b, c, out),
        [a, b, _, _] if a == PAD || b == PAD => return None,
        [a, b, PAD, PAD] => one(a, b, out),
        [_, _, PAD, _] => return None,
        [a, b, c, PAD] => two(a, b, c, out),
        [a, b, c, d] => {
            let packed =
                (u32::from(a) << 18) | (u32::from(b) << 12) | (u32::from(c) << 6) | u32::from(d);
            out.extend_from_slice(&[(packed >> 16) as u8, (packed >> 8) as u8, packed as u8]);
        }
        _ => return None,
    }
    Some(())
}

/// A token part decoded as gRPC's url-safe decoder (ESP's) reads it, because which inputs it
/// accepts decides which message a broken token gets: `-`/`_` alphabet (`+` and `/` refused),
/// `=` padding optional, CR/LF and non-ASCII bytes skipped, unused trailing bits ignored, and
/// padding inside the text tolerated where gRPC tolerates it. An empty result is a failure too.
fn b64_part(part: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(part.len() / 4 * 3 + 2);
    let mut group = [0u8; 4];
    let mut n = 0;
    for &c in part.as_bytes() {
        if c >= 0x80 || c == b'\r' || c == b'\n' {
            continue;
        }
        group[n] = sextet(c)?;
        n += 1;
        if n == 4 {
            decode_group(&group, &mut out)?;
            n = 0;
        }
    }
    if n != 0 {
        decode_group(&group[..n], &mut out)?;
    }
    (!out.is_empty()).then_some(out)
}

/// The algorithms ESP knew, by its rules (`ES256` is matched as a prefix, as ESP's `strncmp`
/// does), plus the ones Portico adds (PS*, ES384, EdDSA; see docs/jwt-auth.md).
fn algorithm(name: &str) -> Option<Algorithm> {
    if name.starts_with("ES256") {
        return Some(Algorithm::ES256);
    }
    name.parse().ok()
}

/// gRPC's claims check, which ESP runs after the time window: an issuer that looks like an
/// email address may only assert itself as subject. gRPC has no name for this status, so ESP
/// answered with its fallback text.
fn email_issuer_asserts_other_subject(payload: &Map<String, Value>, iss: &str) -> bool {
    let is_email = iss
        .split_once('@')
        .is_some_and(|(_, domain)| !domain.is_empty());
    is_email
        && payload
            .get("sub")
            .and_then(Value::as_str)
            .is_some_and(|sub| sub != iss)
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
fn time_claim(payload: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, BadJwt> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)) {
            Some(0) | None => Err(BadJwt::new(
                BAD_CLAIM_TYPES,
                JwtProblem::ClaimNotPositive(name),
            )),
            Some(secs) => Ok(Some(secs)),
        },
        Some(_) => Err(BadJwt::new(
            BAD_CLAIM_TYPES,
            JwtProblem::ClaimNotInteger(name),
        )),
    }
}

/// Parses a token up to (and including) its `iss`. The reason of the error is the complete
/// text that follows `JWT validation failed: `; a token without three sections is
/// [`JwtProblem::BadFormat`] whatever ESP v1's reason.
pub fn parse(token: &str) -> Result<ParsedJwt, BadJwt> {
    parse_parts(token).map_err(|mut e| {
        if !three_sections(token) {
            e.problem = JwtProblem::BadFormat;
        }
        e
    })
}

fn parse_parts(token: &str) -> Result<ParsedJwt, BadJwt> {
    use JwtProblem as P;
    if token.is_empty() {
        return Err(BadJwt::new("Bad JWT format: empty token", P::BadFormat));
    }
    // ESP reads the header before it looks for the second dot, and everything after the
    // second dot (extra dots included) is the signature, whose encoding is then invalid.
    let Some((h, rest)) = token.split_once('.') else {
        return Err(BadJwt::new(
            "Bad JWT format: should have 2 dots",
            P::BadFormat,
        ));
    };
    let header_bytes = b64_part(h).ok_or_else(|| {
        BadJwt::new(
            "Bad JWT format: Invalid base64 in header",
            P::HeaderBadBase64,
        )
    })?;
    let header: Value = serde_json::from_slice(&header_bytes)
        .map_err(|_| BadJwt::new("Bad JWT format: Invalid JSON in header", P::HeaderBadJson))?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| BadJwt::new("Missing alg field.", P::HeaderBadAlg))?;
    let alg = algorithm(alg_name).ok_or_else(|| {
        BadJwt::new(
            format!("Bad JWT format: unsupported alg {alg_name}"),
            P::HeaderUnsupportedAlg,
        )
    })?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    let Some((p, sig)) = rest.split_once('.') else {
        return Err(BadJwt::new(
            "Bad JWT format: should have 2 dots",
            P::BadFormat,
        ));
    };

    let payload_bytes = b64_part(p).ok_or_else(|| {
        BadJwt::new(
            "Bad JWT format: Invalid base64 in claims",
            P::PayloadBadBase64,
        )
    })?;
    let payload: Value = serde_json::from_slice(&payload_bytes)
        .map_err(|_| BadJwt::new("Bad JWT format: Invalid JSON in claims", P::PayloadBadJson))?;
    let Value::Object(payload) = payload else {
        return Err(BadJwt::new(BAD_CLAIM_TYPES, P::PayloadBadJson));
    };
    for name in ["iss", "sub", "jti"] {
        if payload.get(name).is_some_and(|v| !v.is_string()) {
            return Err(BadJwt::new(BAD_CLAIM_TYPES, P::ClaimNotString(name)));
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
        Some(_) => return Err(BadJwt::new(BAD_CLAIM_TYPES, P::AudienceNotStrings)),
    };
    let exp = time_claim(&payload, "exp")?;
    let nbf = time_claim(&payload, "nbf")?;
    time_claim(&payload, "iat")?;
    let iss = match payload.get("iss") {
        Some(Value::String(s)) => s.clone(),
        // ESPv2's verifier needs no `iss`; no provider is configured for an empty one.
        _ => return Err(BadJwt::new(MISSING_ISS, P::UnknownIssuer)),
    };
    let subject_problem = email_issuer_asserts_other_subject(&payload, &iss);
    let signature = b64_part(sig);
    let signature_problem = match &signature {
        Some(bytes) => (alg == Algorithm::ES256 && bytes.len() != 64).then_some((
            "Bad JWT format: signature length is not correct",
            P::VerificationFailed,
        )),
        None => Some((
            "Bad JWT format: invalid base64 for signature",
            if three_sections(token) {
                P::SignatureBadBase64
            } else {
                P::BadFormat
            },
        )),
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
        payload_start: h.len() + 1,
        signature: signature.unwrap_or_default(),
        subject_problem,
        signature_problem,
    })
}

impl ParsedJwt {
    /// The payload segment of `token` (the token this was parsed from), as sent.
    pub fn payload_segment<'t>(&self, token: &'t str) -> Option<&'t str> {
        token.get(self.payload_start..self.signing_input_len)
    }

    /// The rest of ESP's parse, at `now`: time window, an email issuer's subject, signature
    /// encoding, then `aud` present (`sub` is optional, as in ESP since 1.37). The error's
    /// reason is the complete reason.
    pub fn check(&self, now: i64) -> Result<(), BadJwt> {
        self.check_except_audience(now)?;
        if self.aud.is_empty() {
            // ESPv2 always has audiences to check (the service name at least): none match.
            return Err(BadJwt::new(
                "Bad JWT format: missing audience field.",
                JwtProblem::AudienceNotAllowed,
            ));
        }
        Ok(())
    }

    /// [`check`](Self::check) without requiring an `aud`: ESPv2 judges audiences only against
    /// the providers' lists, which may accept any.
    pub fn check_except_audience(&self, now: i64) -> Result<(), BadJwt> {
        if !self.time_valid(now) {
            // ESPv2's verifier looks at `nbf` before `exp`.
            let problem = if self
                .nbf
                .is_some_and(|nbf| nbf > now.saturating_add(CLOCK_SKEW_S))
            {
                JwtProblem::NotYetValid
            } else {
                JwtProblem::Expired
            };
            return Err(BadJwt::new(TIME_CONSTRAINT_FAILURE, problem));
        }
        if self.subject_problem {
            return Err(BadJwt::new(BAD_SUBJECT, JwtProblem::VerificationFailed));
        }
        if let Some((reason, problem)) = self.signature_problem {
            return Err(BadJwt::new(reason, problem));
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
        if self.signature.is_empty() || keys.is_empty() {
            return false;
        }
        // The bytes as ESP decoded them, in the one spelling jsonwebtoken reads.
        let signature = URL_SAFE_NO_PAD.encode(&self.signature);
        keys.iter().any(|k| {
            jsonwebtoken::crypto::verify(&signature, message.as_bytes(), &k.key, self.alg)
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

    /// `check` with ESP v1's reason only.
    fn checked(p: &ParsedJwt, now: i64) -> Result<(), String> {
        p.check(now).map_err(|e| e.reason.into_owned())
    }

    #[test]
    fn format_errors_name_the_problem() {
        let h = enc(r#"{"alg":"RS256"}"#);
        let t = |header: &str, claims: &str| format!("{header}.{}.c2ln", enc(claims));
        assert_eq!(
            parse("abc").unwrap_err(),
            "Bad JWT format: should have 2 dots"
        );
        assert_eq!(parse("").unwrap_err(), "Bad JWT format: empty token");
        // One dot: the header is read first, so its problems win over the missing dot.
        assert_eq!(
            parse("a.b").unwrap_err(),
            "Bad JWT format: Invalid base64 in header"
        );
        assert_eq!(
            parse("invalid.token").unwrap_err(),
            "Bad JWT format: Invalid JSON in header"
        );
        assert_eq!(
            parse(&format!("{}.x", enc("{}"))).unwrap_err(),
            "Missing alg field."
        );
        assert_eq!(
            parse(&format!("{h}.x")).unwrap_err(),
            "Bad JWT format: should have 2 dots"
        );
        assert_eq!(
            parse(&format!("{h}.")).unwrap_err(),
            "Bad JWT format: should have 2 dots"
        );
        assert_eq!(
            parse(&format!("{}.e30.sig", enc(r#"{"alg":"none"}"#))).unwrap_err(),
            "Bad JWT format: unsupported alg none"
        );
        assert_eq!(
            parse(&format!("{}.e30.sig", enc(r#"{"alg":1}"#))).unwrap_err(),
            "Missing alg field."
        );
        assert_eq!(
            parse(&format!("{}.e30.sig", enc("[1]"))).unwrap_err(),
            "Missing alg field."
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
        // `sub` is optional.
        assert_eq!(
            parse(&t(&h, r#"{"iss":"i","aud":["a"]}"#))
                .unwrap()
                .check(0),
            Ok(())
        );
        // Empty parts and an empty signature are invalid base64.
        assert_eq!(
            parse(&format!(".{}.c2ln", enc(ok))).unwrap_err(),
            "Bad JWT format: Invalid base64 in header"
        );
        assert_eq!(
            parse(&format!("{h}..c2ln")).unwrap_err(),
            "Bad JWT format: Invalid base64 in claims"
        );
        assert_eq!(
            parse(&format!("{h}.{}.", enc(ok)))
                .unwrap()
                .check(100)
                .unwrap_err(),
            "Bad JWT format: invalid base64 for signature"
        );
    }

    /// Each failure also names its ESPv2 counterpart; a token without three sections is
    /// `BadFormat` whichever part ESP v1 reads first.
    #[test]
    fn failures_carry_espv2s_problem() {
        use JwtProblem as P;
        let h = enc(r#"{"alg":"RS256"}"#);
        let t = |claims: &str| format!("{h}.{}.c2ln", enc(claims));
        let problem = |token: &str| parse(token).unwrap_err().problem;
        assert_eq!(problem(""), P::BadFormat);
        assert_eq!(problem("abc"), P::BadFormat);
        assert_eq!(problem("a.b"), P::BadFormat);
        assert_eq!(problem("!!.e30.c2ln"), P::HeaderBadBase64);
        assert_eq!(
            problem(&format!("{}.e30.c2ln", enc("{x"))),
            P::HeaderBadJson
        );
        assert_eq!(problem(&format!("{}.e30.c2ln", enc("{}"))), P::HeaderBadAlg);
        assert_eq!(
            problem(&format!("{}.e30.c2ln", enc(r#"{"alg":"none"}"#))),
            P::HeaderUnsupportedAlg
        );
        assert_eq!(problem(&format!("{h}.!!.c2ln")), P::PayloadBadBase64);
        assert_eq!(problem(&t("{x")), P::PayloadBadJson);
        assert_eq!(problem(&t("[1]")), P::PayloadBadJson);
        assert_eq!(problem(&t(r#"{"iss":1}"#)), P::ClaimNotString("iss"));
        assert_eq!(
            problem(&t(r#"{"iss":"i","jti":[]}"#)),
            P::ClaimNotString("jti")
        );
        assert_eq!(
            problem(&t(r#"{"iss":"i","exp":"1"}"#)),
            P::ClaimNotInteger("exp")
        );
        assert_eq!(
            problem(&t(r#"{"iss":"i","nbf":0}"#)),
            P::ClaimNotPositive("nbf")
        );
        assert_eq!(
            problem(&t(r#"{"iss":"i","aud":{}}"#)),
            P::AudienceNotStrings
        );
        assert_eq!(problem(&t(r#"{"sub":"s"}"#)), P::UnknownIssuer);
        let check = |token: &str, now: i64| parse(token).unwrap().check(now).unwrap_err().problem;
        let ok = r#"{"iss":"i","aud":"a","exp":100,"nbf":50}"#;
        assert_eq!(check(&t(ok), 1_000), P::Expired);
        assert_eq!(check(&t(ok), -100), P::NotYetValid);
        assert_eq!(
            check(&format!("{h}.{}.!!", enc(ok)), 60),
            P::SignatureBadBase64
        );
        assert_eq!(check(&format!("{h}.{}.c2ln.eA", enc(ok)), 60), P::BadFormat);
        assert_eq!(check(&t(r#"{"iss":"i"}"#), 0), P::AudienceNotAllowed);
        assert_eq!(
            check(
                &format!("{}.{}.c2ln", enc(r#"{"alg":"ES256"}"#), enc(ok)),
                60
            ),
            P::VerificationFailed
        );
    }

    /// gRPC's claims check: an email-address issuer may only name itself as subject. Judged
    /// after the time window and before the signature's encoding.
    #[test]
    fn email_issuers_must_be_their_own_subject() {
        let h = enc(r#"{"alg":"RS256"}"#);
        let t = |claims: &str, sig: &str| format!("{h}.{}.{sig}", enc(claims));
        let other = r#"{"iss":"sa@p.iam.example","sub":"someone","aud":"a","exp":100}"#;
        assert_eq!(
            checked(&parse(&t(other, "c2ln")).unwrap(), 100),
            Err(BAD_SUBJECT.into())
        );
        assert_eq!(
            checked(&parse(&t(other, "!")).unwrap(), 100),
            Err(BAD_SUBJECT.into())
        );
        assert_eq!(
            checked(&parse(&t(other, "c2ln")).unwrap(), 1_000),
            Err(TIME_CONSTRAINT_FAILURE.into())
        );
        for fine in [
            r#"{"iss":"sa@p.iam.example","sub":"sa@p.iam.example","aud":"a"}"#,
            r#"{"iss":"sa@p.iam.example","aud":"a"}"#,
            r#"{"iss":"trailing@","sub":"x","aud":"a"}"#,
            r#"{"iss":"https://issuer.example","sub":"x","aud":"a"}"#,
        ] {
            assert_eq!(parse(&t(fine, "c2ln")).unwrap().check(0), Ok(()), "{fine}");
        }
    }

    /// Base64 as gRPC read it: which spellings of a part are accepted decides the message.
    #[test]
    fn parts_decode_as_grpc_did() {
        let claims = r#"{"iss":"i","aud":"a"}"#;
        let body = enc(claims);
        let h = enc(r#"{"alg":"RS256"}"#);
        // Padding, CR/LF and non-ASCII bytes are tolerated; the payload is the same.
        let padded = base64::engine::general_purpose::URL_SAFE.encode(claims);
        for variant in [
            padded.clone(),
            format!("{}\r\n{}", &body[..4], &body[4..]),
            format!("{}\u{e9}{}", &body[..4], &body[4..]),
        ] {
            let p = parse(&format!("{h}.{variant}.c2ln")).unwrap();
            assert_eq!(p.iss, "i", "{variant:?}");
        }
        // Unused trailing bits are ignored: `c2m` and `c2n` differ only in them.
        assert_eq!(b64_part("c2m"), b64_part("c2n"));
        assert_eq!(b64_part("c2m").unwrap(), b"si");
        // The standard alphabet's `+` and `/` are refused, as are other characters and a lone
        // trailing character.
        for bad in [
            "ab+c", "ab/c", "ab c", "ab*c", "abcde", "=abc", "a=bc", "ab=c", "====",
        ] {
            assert_eq!(b64_part(bad), None, "{bad}");
        }
        assert_eq!(b64_part("YQ=="), Some(b"a".to_vec()));
        assert_eq!(b64_part("YWI="), Some(b"ab".to_vec()));
        assert_eq!(b64_part(""), None);
        assert_eq!(b64_part("\r\n"), None);
        // A signature in any spelling gRPC accepts is the same signature.
        let p = parse(&format!("{h}.{body}.c2ln")).unwrap();
        let q = parse(&format!("{h}.{body}.c2ln\r\n")).unwrap();
        assert_eq!(p.signature, q.signature);
        // ES256 is matched by prefix, as ESP's strncmp did.
        let es = parse(&format!("{}.{body}.c2ln", enc(r#"{"alg":"ES256K"}"#))).unwrap();
        assert_eq!(es.alg, Algorithm::ES256);
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
        assert_eq!(checked(&neg, 56), Err(TIME_CONSTRAINT_FAILURE.into()));
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
