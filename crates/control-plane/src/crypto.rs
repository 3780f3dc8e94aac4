//! Secrets at rest for the identity APIs.
//!
//! * [`MasterKey`] — 32 random bytes kept **outside** the database: `DIR/master-key` (mode 0600,
//!   created on first start) for the embedded single-node setup, or `PORTICO_MASTER_KEY` /
//!   `--master-key-file` when several control-plane replicas share one PostgreSQL database (they
//!   must all hold the same key). Two sub-keys are derived from it, one per purpose, so the
//!   encryption key is never also used as a MAC key.
//! * [`MasterKey::seal`] / [`MasterKey::open`] — AES-256-GCM with a random 96-bit nonce; the
//!   record's identity is bound in as associated data, so a ciphertext copied onto another row
//!   fails to open instead of silently decrypting.
//! * [`MasterKey::keyed_hash`] — HMAC-SHA256, the lookup index for API key strings: lets
//!   `keys:lookupKey` and Service Control find a key by equality without the database holding
//!   anything that can be brute-forced offline without the master key.
//! * [`token_hash`] — plain SHA-256 for high-entropy random bearer tokens (256-bit), where a key
//!   adds nothing and would tie token validity to key rotation.
//! * [`decode_base64_lenient`] — gcloud echoes bytes fields (policy etags) in the URL-safe
//!   alphabet, sometimes without padding; both alphabets must decode.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::{Rng as _, RngCore as _};
use sha2::{Digest, Sha256};

/// Environment variable holding the master key (base64 or hex of 32 bytes) in multi-node mode.
pub const MASTER_KEY_ENV: &str = "PORTICO_MASTER_KEY";
/// File name of the generated master key inside the data directory.
pub const MASTER_KEY_FILE: &str = "master-key";

const SEALED_PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot read master key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create master key file {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    // The offending value is deliberately not echoed: it is (a mangled) secret.
    #[error(
        "master key from {origin} must be 32 bytes encoded as base64 (44 chars) or hex (64 chars)"
    )]
    BadMasterKey { origin: String },
    #[error("master key file {path} is readable by group/others (mode {mode:o}); chmod 600 it")]
    LooseMode { path: String, mode: u32 },
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not authenticate under this master key")]
    Unauthentic,
}

/// The control plane's master key. `Debug` never prints key material.
#[derive(Clone)]
pub struct MasterKey {
    enc: [u8; 32],
    mac: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// HMAC-SHA256 keyed with a 32-byte key. HMAC zero-pads short keys to the 64-byte block, so
/// padding here and using the infallible constructor is the same function without an error path.
fn hmac_with(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
}

fn derive(raw: &[u8; 32], label: &[u8]) -> [u8; 32] {
    // HMAC as a PRF gives independent sub-keys from one stored secret.
    let mut mac = hmac_with(raw);
    mac.update(label);
    mac.finalize().into_bytes().into()
}

impl MasterKey {
    pub fn from_raw(raw: &[u8; 32]) -> Self {
        Self {
            enc: derive(raw, b"portico/v1/seal"),
            mac: derive(raw, b"portico/v1/lookup-hash"),
        }
    }

    /// Parses an encoded key (base64 either alphabet, or 64 hex chars); surrounding whitespace
    /// (a trailing newline in a file or a Kubernetes secret) is ignored.
    pub fn parse(encoded: &str, origin: &str) -> Result<Self, CryptoError> {
        let text = encoded.trim();
        let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            decode_base64_lenient(text)
        };
        let raw: [u8; 32] =
            bytes
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| CryptoError::BadMasterKey {
                    origin: origin.to_string(),
                })?;
        Ok(Self::from_raw(&raw))
    }

    /// Reads a key file written by [`MasterKey::load_or_create`] or by an operator.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CryptoError::Read {
            path: shown.clone(),
            source,
        })?;
        check_private_mode(path)?;
        Self::parse(&text, &shown)
    }

    /// `DIR/master-key`, generated (0600, written atomically) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, CryptoError> {
        let path = dir.join(MASTER_KEY_FILE);
        if path.exists() {
            return Self::from_file(&path);
        }
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        write_private_file(&path, &format!("{}\n", STANDARD.encode(raw)))?;
        tracing::info!(path = %path.display(), "generated a new master key");
        Ok(Self::from_raw(&raw))
    }

    /// Precedence: `PORTICO_MASTER_KEY`, then an explicit `--master-key-file`, then the data dir.
    /// With none of them (PostgreSQL without a data dir) there is nowhere safe to keep a
    /// generated key, so that is an error rather than a key that is lost on restart.
    pub fn resolve(
        explicit_file: Option<&Path>,
        data_dir: Option<&Path>,
    ) -> Result<Self, CryptoError> {
        if let Ok(v) = std::env::var(MASTER_KEY_ENV) {
            if !v.trim().is_empty() {
                return Self::parse(&v, MASTER_KEY_ENV);
            }
        }
        if let Some(file) = explicit_file {
            return Self::from_file(file);
        }
        match data_dir {
            Some(dir) => Self::load_or_create(dir),
            None => Err(CryptoError::BadMasterKey {
                origin: format!(
                    "nowhere: set {MASTER_KEY_ENV}, pass --master-key-file or --data DIR"
                ),
            }),
        }
    }

    /// Encrypts `plaintext`, binding `aad` (e.g. the record's uid). Output is printable ASCII.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, CryptoError> {
        let cipher = Aes256Gcm::new(&self.enc.into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Malformed)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(format!("{SEALED_PREFIX}{}", STANDARD.encode(out)))
    }

    /// Reverses [`MasterKey::seal`]; fails if the key, the `aad` or the bytes differ.
    pub fn open(&self, aad: &[u8], sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let body = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(CryptoError::Malformed)?;
        let bytes = STANDARD.decode(body).map_err(|_| CryptoError::Malformed)?;
        if bytes.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let cipher = Aes256Gcm::new(&self.enc.into());
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| CryptoError::Unauthentic)
    }

    /// HMAC-SHA256 of `data` under the lookup sub-key, domain-separated by `purpose`; hex.
    pub fn keyed_hash(&self, purpose: &str, data: &[u8]) -> String {
        let mut mac = hmac_with(&self.mac);
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data);
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(unix)]
fn check_private_mode(path: &Path) -> Result<(), CryptoError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|source| CryptoError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::LooseMode {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path) -> Result<(), CryptoError> {
    Ok(())
}

/// Writes `contents` to `path` with mode 0600 from the first byte (no window where the secret is
/// world-readable), via a temp file + rename so a crash never leaves a half-written key.
pub fn write_private_file(path: &Path, contents: &str) -> Result<(), CryptoError> {
    use std::io::Write as _;
    let err = |source| CryptoError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// A self-signed X.509 certificate (PEM) for an RSA key (PKCS#8 PEM), valid from a minute ago
/// to 9999, with `common_name` as subject: the form Google publishes keys in as X.509 maps.
pub fn self_signed_certificate(
    private_pkcs8_pem: &str,
    common_name: &str,
) -> Result<String, String> {
    let key_pair =
        rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(private_pkcs8_pem, &rcgen::PKCS_RSA_SHA256)
            .map_err(|e| format!("key pair for certificate: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("certificate params: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = time::macros::datetime!(9999-12-31 23:59:59 UTC);
    let serial: [u8; 16] = rand::random();
    // A positive serial: clear the top bit of the DER INTEGER.
    let mut serial = serial.to_vec();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| format!("self-signing certificate: {e}"))?;
    Ok(cert.pem())
}

/// SHA-256 hex of a random bearer token: what is stored instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `nbytes` of OS randomness, base64url without padding.
pub fn random_urlsafe(nbytes: usize) -> String {
    let mut buf = vec![0u8; nbytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A Google-format API key string: `AIza` + 35 characters of `[A-Za-z0-9_-]` (≈209 bits).
pub fn new_api_key_string() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rngs::OsRng;
    let mut s = String::with_capacity(39);
    s.push_str("AIza");
    for _ in 0..35 {
        s.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    s
}

/// Decodes base64 in either alphabet, with correct padding or none; only the ends are
/// trimmed.
///
/// Stricter than [`crate::authz::decode_base64_any`]: white space inside the text and stray or
/// partial `=` padding are refused rather than dropped. Its callers (the master-key file,
/// `authz::canonical_etag`, page tokens of the lists that word page sizes as a "number") have
/// always answered such text with their own error, and a looser decoder would accept values
/// they refuse today; the two stay separate so neither set of callers changes behaviour.
pub fn decode_base64_lenient(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.contains(['-', '_']) {
        URL_SAFE
            .decode(s)
            .or_else(|_| URL_SAFE_NO_PAD.decode(s))
            .ok()
    } else {
        STANDARD
            .decode(s)
            .or_else(|_| STANDARD_NO_PAD.decode(s))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_raw(&[7u8; 32])
    }

    #[test]
    fn seal_round_trips_and_binds_aad() {
        let k = key();
        let sealed = k.seal(b"uid-1", b"AIzaSecret").expect("seal");
        assert!(!sealed.contains("AIzaSecret"));
        assert_eq!(k.open(b"uid-1", &sealed).expect("open"), b"AIzaSecret");
        assert!(matches!(
            k.open(b"uid-2", &sealed),
            Err(CryptoError::Unauthentic)
        ));
        let other = MasterKey::from_raw(&[8u8; 32]);
        assert!(matches!(
            other.open(b"uid-1", &sealed),
            Err(CryptoError::Unauthentic)
        ));
        assert!(matches!(
            k.open(b"uid-1", "v1:AAAA"),
            Err(CryptoError::Malformed)
        ));
        // Random nonces: sealing twice gives different ciphertexts.
        assert_ne!(sealed, k.seal(b"uid-1", b"AIzaSecret").expect("seal"));
    }

    #[test]
    fn keyed_hash_depends_on_key_and_purpose() {
        let k = key();
        let h = k.keyed_hash("apikey", b"AIzaX");
        assert_eq!(h.len(), 64);
        assert_eq!(h, k.keyed_hash("apikey", b"AIzaX"));
        assert_ne!(h, k.keyed_hash("other", b"AIzaX"));
        assert_ne!(
            h,
            MasterKey::from_raw(&[9u8; 32]).keyed_hash("apikey", b"AIzaX")
        );
    }

    #[test]
    fn master_key_file_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = MasterKey::load_or_create(dir.path()).expect("create");
        let path = dir.path().join(MASTER_KEY_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let b = MasterKey::load_or_create(dir.path()).expect("reload");
        assert_eq!(a.keyed_hash("p", b"x"), b.keyed_hash("p", b"x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = MasterKey::from_file(&path).expect_err("loose mode refused");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn parse_accepts_hex_and_base64_and_rejects_garbage_without_echoing_it() {
        let hex_key = "00".repeat(32);
        let b64_key = STANDARD.encode([0u8; 32]);
        let a = MasterKey::parse(&hex_key, "env").expect("hex");
        let b = MasterKey::parse(&format!("{b64_key}\n"), "env").expect("b64");
        assert_eq!(a.keyed_hash("p", b"x"), b.keyed_hash("p", b"x"));
        let err = MasterKey::parse("tooshort-secretish", "env").expect_err("short");
        assert!(!err.to_string().contains("secretish"));
    }

    #[test]
    fn resolve_prefers_explicit_file_and_refuses_nowhere() {
        if std::env::var(MASTER_KEY_ENV).is_ok() {
            eprintln!("SKIPPED: resolve test: {MASTER_KEY_ENV} is set in this environment");
            return;
        }
        let shared = tempfile::tempdir().expect("tempdir");
        let file = shared.path().join("shared-key");
        write_private_file(&file, &format!("{}\n", "ab".repeat(32))).expect("write");
        let node_a = tempfile::tempdir().expect("tempdir");
        let node_b = tempfile::tempdir().expect("tempdir");
        // Two replicas given the same file agree, and neither generates its own key.
        let a = MasterKey::resolve(Some(&file), Some(node_a.path())).expect("a");
        let b = MasterKey::resolve(Some(&file), Some(node_b.path())).expect("b");
        assert_eq!(a.keyed_hash("p", b"x"), b.keyed_hash("p", b"x"));
        assert!(!node_a.path().join(MASTER_KEY_FILE).exists());
        // Without a file, each data dir gets its own key.
        let c = MasterKey::resolve(None, Some(node_a.path())).expect("c");
        assert_ne!(a.keyed_hash("p", b"x"), c.keyed_hash("p", b"x"));
        assert!(MasterKey::resolve(None, None).is_err());
        assert!(MasterKey::resolve(Some(&shared.path().join("missing")), None).is_err());
    }

    #[test]
    fn api_key_strings_have_google_shape() {
        for _ in 0..50 {
            let k = new_api_key_string();
            assert_eq!(k.len(), 39);
            assert!(k.starts_with("AIza"));
            assert!(k[4..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        }
        assert_ne!(new_api_key_string(), new_api_key_string());
    }

    #[test]
    fn lenient_base64_accepts_both_alphabets() {
        assert_eq!(
            decode_base64_lenient("APrp7M925/g="),
            decode_base64_lenient("APrp7M925_g=")
        );
        assert_eq!(
            decode_base64_lenient("APrp7M925_g").expect("nopad").len(),
            8
        );
        assert!(decode_base64_lenient("W/\"abc\"").is_none());
    }
}
