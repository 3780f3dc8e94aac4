//! Verification key sets as providers publish them, parsed once per fetch.
//!
//! A `jwks_uri` may answer with any of the formats ESP accepts:
//! - a JWKS (`{"keys":[{"kty":"RSA"|"EC"|"OKP"|"oct", ...}]}`);
//! - Google's X.509 map (`{"<kid>": "-----BEGIN CERTIFICATE-----..."}`), whose certificates'
//!   SubjectPublicKeyInfo we extract with a small DER walk;
//! - a PEM public key;
//! - anything else is kept as a raw shared secret, usable only by `HS*` tokens.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};

/// The family of algorithms a key can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    /// EC on the named curve; only the matching `ES*` algorithm may use it.
    EcP256,
    EcP384,
    Ed25519,
    Secret,
}

impl KeyKind {
    /// Whether a token signed with `alg` can be checked with a key of this kind.
    pub fn accepts(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
            KeyKind::Secret => matches!(alg, HS256 | HS384 | HS512),
        }
    }
}

/// One usable verification key.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material (secrets in particular) stays out of logs.
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// All keys from one fetch of a key URI.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<VerifyKey>,
}

/// The outcome of looking for keys for one token.
pub enum KeyMatch<'a> {
    /// Candidate keys to try, in order.
    Found(Vec<&'a VerifyKey>),
    /// The token names a kid and no key carries it.
    KidNotFound,
}

impl KeySet {
    /// Parses a fetched body. Never fails: a body that is no recognised key format is kept as a
    /// shared secret, which is how ESP treats HMAC keys served from a URI, except for bodies
    /// that are evidently not a secret (JSON, markup, PEM, empty), which yield no keys.
    pub fn parse(body: &[u8]) -> KeySet {
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
            // JSON that is no key set (an error object, say) is never a secret: its text is
            // public, so anyone could sign HS256 tokens with it.
            return parse_json(&json).unwrap_or_default();
        }
        if let Ok(text) = std::str::from_utf8(body) {
            let text = text.trim();
            if let Some(key) = parse_pem_key(text, None) {
                return KeySet { keys: vec![key] };
            }
            // Same for markup (an HTML error or login page answered with 200), and for PEM
            // blocks we could not use.
            if text.is_empty() || text.starts_with('<') || text.starts_with("-----BEGIN") {
                return KeySet::default();
            }
        }
        KeySet {
            keys: vec![VerifyKey {
                kid: None,
                alg: None,
                kind: KeyKind::Secret,
                key: DecodingKey::from_secret(body),
            }],
        }
    }

    /// Keys that may verify a token with this `kid` and `alg`.
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> KeyMatch<'_> {
        let usable = |k: &&VerifyKey| k.kind.accepts(alg) && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => {
                // Keys named by the kid, else keys without any kid (a bare secret or PEM applies
                // to every kid). Filtering by algorithm comes after choosing the group, so a
                // token whose algorithm does not fit its key fails verification, not the lookup.
                let named = self.keys.iter().any(|k| k.kid.as_deref() == Some(kid));
                let anonymous = self.keys.iter().any(|k| k.kid.is_none());
                if !named && !anonymous {
                    return KeyMatch::KidNotFound;
                }
                KeyMatch::Found(
                    self.keys
                        .iter()
                        .filter(|k| {
                            if named {
                                k.kid.as_deref() == Some(kid)
                            } else {
                                k.kid.is_none()
                            }
                        })
                        .filter(usable)
                        .collect(),
                )
            }
            None => KeyMatch::Found(self.keys.iter().filter(usable).collect()),
        }
    }
}

fn parse_json(json: &serde_json::Value) -> Option<KeySet> {
    let obj = json.as_object()?;
    if let Some(keys) = obj.get("keys").and_then(|k| k.as_array()) {
        let keys = keys.iter().filter_map(parse_jwk).collect();
        return Some(KeySet { keys });
    }
    // Google's X.509 map: every value a PEM certificate.
    if !obj.is_empty() && obj.values().all(|v| v.as_str().is_some()) {
        let keys = obj
            .iter()
            .filter_map(|(kid, pem)| parse_pem_key(pem.as_str()?, Some(kid.clone())))
            .collect();
        return Some(KeySet { keys });
    }
    None
}

fn parse_alg(s: &str) -> Option<Algorithm> {
    s.parse().ok()
}

/// One JWK; unusable entries (unknown `kty`, bad numbers) are skipped, not fatal, so that one
/// odd key does not take the provider's other keys down with it.
fn parse_jwk(v: &serde_json::Value) -> Option<VerifyKey> {
    let field = |name: &str| v.get(name).and_then(|x| x.as_str());
    let kid = field("kid").map(str::to_owned);
    let alg = field("alg").and_then(parse_alg);
    if field("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let (kind, key) = match field("kty")? {
        "RSA" => (
            KeyKind::Rsa,
            DecodingKey::from_rsa_components(field("n")?, field("e")?).ok()?,
        ),
        "EC" => {
            let kind = match field("crv")? {
                "P-256" => KeyKind::EcP256,
                "P-384" => KeyKind::EcP384,
                _ => return None,
            };
            (
                kind,
                DecodingKey::from_ec_components(field("x")?, field("y")?).ok()?,
            )
        }
        "OKP" if field("crv")? == "Ed25519" => (
            KeyKind::Ed25519,
            DecodingKey::from_ed_components(field("x")?).ok()?,
        ),
        "oct" => {
            let secret = URL_SAFE_NO_PAD
                .decode(field("k")?.trim_end_matches('='))
                .ok()?;
            (KeyKind::Secret, DecodingKey::from_secret(&secret))
        }
        _ => return None,
    };
    Some(VerifyKey {
        kid,
        alg,
        kind,
        key,
    })
}

/// A PEM certificate or public key.
fn parse_pem_key(pem: &str, kid: Option<String>) -> Option<VerifyKey> {
    let (label, der) = pem_decode(pem)?;
    let spki = match label.as_str() {
        "CERTIFICATE" => certificate_spki(&der)?,
        "PUBLIC KEY" => der,
        "RSA PUBLIC KEY" => {
            return Some(VerifyKey {
                kid,
                alg: None,
                kind: KeyKind::Rsa,
                key: DecodingKey::from_rsa_der(&der),
            })
        }
        _ => return None,
    };
    let (kind, key) = spki_key(&spki)?;
    Some(VerifyKey {
        kid,
        alg: None,
        kind,
        key,
    })
}

fn pem_decode(pem: &str) -> Option<(String, Vec<u8>)> {
    let pem = pem.trim();
    let rest = pem.strip_prefix("-----BEGIN ")?;
    let (label, rest) = rest.split_once("-----")?;
    let end = format!("-----END {label}-----");
    let (body, _) = rest.split_once(end.as_str())?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    Some((label.to_string(), STANDARD.decode(b64).ok()?))
}

/// A DER TLV: (tag, contents, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;

/// The SubjectPublicKeyInfo (whole TLV) of an X.509 certificate.
fn certificate_spki(der: &[u8]) -> Option<Vec<u8>> {
    let (tag, cert, _) = der_next(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_next(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // tbsCertificate: [0] version (optional), serialNumber, signature, issuer, validity,
    // subject, subjectPublicKeyInfo.
    let (tag, _, after) = der_next(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..5 {
        let (_, _, after) = der_next(rest)?;
        rest = after;
    }
    let (tag, body, after) = der_next(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let len = rest.len() - after.len();
    debug_assert!(body.len() <= len);
    Some(rest[..len].to_vec())
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// A key from a SubjectPublicKeyInfo TLV.
fn spki_key(spki: &[u8]) -> Option<(KeyKind, DecodingKey)> {
    let (tag, body, _) = der_next(spki)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, alg_id, rest) = der_next(body)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, bits, _) = der_next(rest)?;
    // BIT STRING whose first byte counts unused bits (always 0 for keys).
    if tag != 0x03 || bits.first() != Some(&0) {
        return None;
    }
    let key_bytes = &bits[1..];
    let (tag, oid, params) = der_next(alg_id)?;
    if tag != 0x06 {
        return None;
    }
    if oid == OID_RSA {
        Some((KeyKind::Rsa, DecodingKey::from_rsa_der(key_bytes)))
    } else if oid == OID_EC {
        let (_, curve, _) = der_next(params)?;
        let kind = if curve == OID_P256 {
            KeyKind::EcP256
        } else if curve == OID_P384 {
            KeyKind::EcP384
        } else {
            return None;
        };
        Some((kind, DecodingKey::from_ec_der(key_bytes)))
    } else if oid == OID_ED25519 {
        Some((KeyKind::Ed25519, DecodingKey::from_ed_der(key_bytes)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_are_bounds_checked() {
        assert!(der_next(&[0x30, 0x82, 0xff]).is_none());
        assert!(der_next(&[0x30, 0x05, 1, 2]).is_none());
        let (tag, body, rest) = der_next(&[0x02, 0x01, 0x07, 0xaa]).unwrap();
        assert_eq!((tag, body, rest), (0x02, &[7u8][..], &[0xaau8][..]));
    }

    #[test]
    fn unrecognised_body_becomes_a_secret() {
        let set = KeySet::parse(b"my-shared-secret");
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kind, KeyKind::Secret);
        assert!(
            matches!(set.candidates(Some("k"), Algorithm::HS256), KeyMatch::Found(v) if v.len() == 1)
        );
        assert!(
            matches!(set.candidates(None, Algorithm::RS256), KeyMatch::Found(v) if v.is_empty())
        );
    }

    #[test]
    fn public_looking_bodies_are_never_secrets() {
        for body in [
            &br#"{"error":"not found"}"#[..],
            b"<html>oops</html>",
            b"",
            b"  \n",
        ] {
            assert!(
                KeySet::parse(body).keys.is_empty(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn jwks_kid_lookup() {
        let body =
            br#"{"keys":[{"kty":"oct","kid":"a","k":"c2VjcmV0"},{"kty":"weird","kid":"b"}]}"#;
        let set = KeySet::parse(body);
        assert_eq!(set.keys.len(), 1);
        assert!(
            matches!(set.candidates(Some("a"), Algorithm::HS256), KeyMatch::Found(v) if v.len() == 1)
        );
        assert!(matches!(
            set.candidates(Some("b"), Algorithm::HS256),
            KeyMatch::KidNotFound
        ));
    }

    #[test]
    fn x509_map_with_garbage_cert_is_an_empty_set_not_a_secret() {
        let set = KeySet::parse(
            br#"{"k1":"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}"#,
        );
        assert!(set.keys.is_empty());
    }

    /// Fetched bodies are attacker-influenced: truncated and bit-flipped certificates and
    /// random bytes must never panic the DER walk.
    #[test]
    fn mangled_certificates_never_panic() {
        use rand::{Rng as _, SeedableRng as _};
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let der = cert.der().to_vec();
        assert!(certificate_spki(&der).is_some());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..2_000 {
            let mut d = der.clone();
            if i % 2 == 0 {
                d.truncate(rng.gen_range(0..der.len()));
            } else {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..d.len());
                    d[at] ^= 1 << rng.gen_range(0..8);
                }
            }
            if let Some(spki) = certificate_spki(&d) {
                let _ = spki_key(&spki);
            }
            let pem = format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                STANDARD.encode(&d)
            );
            let _ = KeySet::parse(serde_json::json!({ "k": pem }).to_string().as_bytes());
        }
        for _ in 0..500 {
            let len = rng.gen_range(0..300);
            let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = certificate_spki(&junk);
            let _ = spki_key(&junk);
            let _ = KeySet::parse(&junk);
        }
    }
}
