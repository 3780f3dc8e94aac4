//! Verification key sets as providers publish them, parsed once per fetch.
//!
//! A `jwks_uri` may answer with any of the formats ESP accepts:
//! - a JWKS (`{"keys":[{"kty":"RSA"|"EC"|"OKP"|"oct", ...}]}`);
//! - Google's X.509 map (`{"<kid>": "-----BEGIN CERTIFICATE-----..."}`), whose certificates'
//!   SubjectPublicKeyInfo we extract with a small DER walk;
//! - a PEM public key (a convenience; ESP did not read these);
//! - for `HS*` tokens, the body is the base64url encoding of the shared secret (as in ESP).

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

/// How the fetched body was shaped; decides ESP's messages when no key fits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Format {
    /// A JSON object with `keys` (`keys_is_array` false when that member is not an array).
    Jwks { keys_is_array: bool, entries: usize },
    /// Any other JSON: read as Google's X.509 map (`kid` → PEM certificate).
    X509,
    /// A PEM public key or certificate (not an ESP format; accepted for convenience).
    Pem,
    /// Not JSON: only usable as a base64url-encoded HMAC secret.
    #[default]
    Opaque,
}

/// All keys from one fetch of a key URI.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub format: Format,
    pub keys: Vec<VerifyKey>,
    /// X.509 map entries whose certificate held no usable key.
    pub unusable_kids: Vec<String>,
    /// For `HS*` tokens: the body decoded as base64url, as ESP reads HMAC secrets.
    secret: Option<VerifyKey>,
}

/// The outcome of looking for keys for one token.
#[derive(Debug)]
pub enum KeyMatch<'a> {
    /// Candidate keys to try, and the reason to give when none verifies.
    Found(Vec<&'a VerifyKey>, &'static str),
    /// The token names a kid that no key carries (worth one refresh); the reason.
    KidNotFound(String),
    /// No key can be used for this token; the reason.
    Unusable(String),
}

const SIGNATURE_FAILED: &str = "JWT signature verification failed.";
const NO_KEY_VALIDATES: &str = "The JWT cannot be validated with any of the public keys.";

impl KeySet {
    /// Parses a fetched body. Never fails: what a body is good for is decided per token by
    /// [`KeySet::candidates`], which gives ESP's message when it is good for nothing.
    pub fn parse(body: &[u8]) -> KeySet {
        // ESP takes an `HS*` key as the base64url encoding of the secret. JSON and markup are
        // never valid base64url, so a public error page cannot become a signing secret.
        let secret = std::str::from_utf8(body)
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .and_then(|t| URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')).ok())
            .filter(|s| !s.is_empty())
            .map(|s| VerifyKey {
                kid: None,
                alg: None,
                kind: KeyKind::Secret,
                key: DecodingKey::from_secret(&s),
            });
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
            return KeySet {
                secret,
                ..parse_json(&json)
            };
        }
        if let Some(key) = std::str::from_utf8(body)
            .ok()
            .and_then(|t| parse_pem_key(t.trim(), None))
        {
            return KeySet {
                format: Format::Pem,
                keys: vec![key],
                unusable_kids: Vec::new(),
                secret: None,
            };
        }
        KeySet {
            format: Format::Opaque,
            keys: Vec::new(),
            unusable_kids: Vec::new(),
            secret,
        }
    }

    /// Keys that may verify a token with this `kid` and `alg`, following ESP's rules for each
    /// format (and its messages when none fits).
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> KeyMatch<'_> {
        let usable = |k: &&VerifyKey| k.kind.accepts(alg) && k.alg.is_none_or(|a| a == alg);
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        if hmac {
            // A JWKS may carry `oct` keys (our extension); otherwise the body is the secret.
            let has_oct = self.keys.iter().any(|k| k.kind == KeyKind::Secret);
            if !has_oct {
                return match &self.secret {
                    Some(secret) => KeyMatch::Found(vec![secret], SIGNATURE_FAILED),
                    None => KeyMatch::Unusable(
                        "Invalid base64 encoded HS symmetric key. \
                         Most likely JWT alg is HS, but public key is ES or RSA."
                            .into(),
                    ),
                };
            }
        }
        match &self.format {
            Format::Opaque => KeyMatch::Unusable("Invalid JSON for public key".into()),
            Format::Pem => {
                KeyMatch::Found(self.keys.iter().filter(usable).collect(), SIGNATURE_FAILED)
            }
            Format::Jwks {
                keys_is_array: false,
                ..
            } => {
                KeyMatch::Unusable("Unexpected value type of keys property in jwks key set.".into())
            }
            Format::Jwks { entries: 0, .. } => {
                KeyMatch::Unusable("The jwks key set is empty".into())
            }
            Format::Jwks { .. } => match kid {
                Some(kid) => {
                    let named: Vec<&VerifyKey> = self
                        .keys
                        .iter()
                        .filter(|k| k.kid.as_deref() == Some(kid))
                        .filter(usable)
                        .collect();
                    if named.is_empty() {
                        KeyMatch::KidNotFound(format!(
                            "Cannot find matching key in key set for kid={kid}"
                        ))
                    } else {
                        KeyMatch::Found(named, SIGNATURE_FAILED)
                    }
                }
                None => {
                    KeyMatch::Found(self.keys.iter().filter(usable).collect(), NO_KEY_VALIDATES)
                }
            },
            Format::X509 => match kid {
                Some(kid) => {
                    if self.unusable_kids.iter().any(|k| k == kid) {
                        return KeyMatch::Unusable(format!(
                            "Failed to extract public key from X509 for kid={kid}"
                        ));
                    }
                    let named: Vec<&VerifyKey> = self
                        .keys
                        .iter()
                        .filter(|k| k.kid.as_deref() == Some(kid))
                        .collect();
                    if named.is_empty() {
                        KeyMatch::KidNotFound(format!(
                            "Could not find matching key in public key set for kid={kid}"
                        ))
                    } else {
                        // A certificate of the wrong key type fails verification, as in ESP.
                        KeyMatch::Found(
                            named.into_iter().filter(usable).collect(),
                            SIGNATURE_FAILED,
                        )
                    }
                }
                None => {
                    KeyMatch::Found(self.keys.iter().filter(usable).collect(), NO_KEY_VALIDATES)
                }
            },
        }
    }
}

fn parse_json(json: &serde_json::Value) -> KeySet {
    let Some(obj) = json.as_object() else {
        return KeySet {
            format: Format::X509,
            ..KeySet::default()
        };
    };
    if let Some(keys) = obj.get("keys") {
        let Some(entries) = keys.as_array() else {
            return KeySet {
                format: Format::Jwks {
                    keys_is_array: false,
                    entries: 0,
                },
                ..KeySet::default()
            };
        };
        return KeySet {
            format: Format::Jwks {
                keys_is_array: true,
                entries: entries.len(),
            },
            keys: entries.iter().filter_map(parse_jwk).collect(),
            ..KeySet::default()
        };
    }
    let mut set = KeySet {
        format: Format::X509,
        ..KeySet::default()
    };
    for (kid, pem) in obj {
        match pem
            .as_str()
            .and_then(|p| parse_pem_key(p, Some(kid.clone())))
        {
            Some(key) => set.keys.push(key),
            None => set.unusable_kids.push(kid.clone()),
        }
    }
    set
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
    fn hmac_secret_is_the_base64url_body() {
        let set = KeySet::parse(b"c2VjcmV0\n");
        assert_eq!(set.format, Format::Opaque);
        assert!(
            matches!(set.candidates(Some("k"), Algorithm::HS256), KeyMatch::Found(v, _) if v.len() == 1)
        );
        assert!(matches!(
            set.candidates(None, Algorithm::RS256),
            KeyMatch::Unusable(m) if m == "Invalid JSON for public key"
        ));
    }

    #[test]
    fn public_looking_bodies_are_never_secrets() {
        for body in [
            &br#"{"error":"not found"}"#[..],
            b"<html>oops</html>",
            b"",
            b"  \n",
        ] {
            let set = KeySet::parse(body);
            assert!(
                matches!(set.candidates(None, Algorithm::HS256), KeyMatch::Unusable(m) if m.starts_with("Invalid base64 encoded HS")),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn jwks_kid_lookup_and_messages() {
        let body =
            br#"{"keys":[{"kty":"oct","kid":"a","k":"c2VjcmV0"},{"kty":"weird","kid":"b"}]}"#;
        let set = KeySet::parse(body);
        assert_eq!(set.keys.len(), 1);
        assert!(
            matches!(set.candidates(Some("a"), Algorithm::HS256), KeyMatch::Found(v, _) if v.len() == 1)
        );
        assert!(matches!(
            set.candidates(Some("b"), Algorithm::HS256),
            KeyMatch::KidNotFound(m) if m == "Cannot find matching key in key set for kid=b"
        ));
        assert!(matches!(
            KeySet::parse(br#"{"keys":[]}"#).candidates(None, Algorithm::RS256),
            KeyMatch::Unusable(m) if m == "The jwks key set is empty"
        ));
        assert!(matches!(
            KeySet::parse(br#"{"keys":{}}"#).candidates(None, Algorithm::RS256),
            KeyMatch::Unusable(m) if m == "Unexpected value type of keys property in jwks key set."
        ));
    }

    #[test]
    fn x509_map_messages() {
        let set = KeySet::parse(
            br#"{"k1":"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}"#,
        );
        assert_eq!(set.format, Format::X509);
        assert!(set.keys.is_empty());
        assert!(matches!(
            set.candidates(Some("k1"), Algorithm::RS256),
            KeyMatch::Unusable(m) if m == "Failed to extract public key from X509 for kid=k1"
        ));
        assert!(matches!(
            set.candidates(Some("k2"), Algorithm::RS256),
            KeyMatch::KidNotFound(m) if m == "Could not find matching key in public key set for kid=k2"
        ));
        assert!(matches!(
            set.candidates(None, Algorithm::RS256),
            KeyMatch::Found(v, m) if v.is_empty() && m == NO_KEY_VALIDATES
        ));
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
