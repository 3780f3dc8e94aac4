//! TLS: what the serving side ([`ServerTls`]: `--ssl_port`, ESPv2's `--ssl_server_*`) and the
//! backend side ([`BackendTls`]: trust anchors, the proxy's client certificate) are set up with,
//! and the rustls configurations built from that at start-up ([`server_config`],
//! [`client_config`]). Nothing here runs per request.
//!
//! A leaf module: it reads files and builds rustls values, and imports no serving code. Every
//! file problem (missing, unreadable, not a regular file, larger than [`MAX_PEM_FILE_BYTES`], no
//! PEM block of the right kind, a block that does not decode, a certificate that is not X.509, a
//! key that does not match its certificate, an encrypted key) is a [`TlsError`] that names the
//! file.
//!
//! Protocol versions: rustls speaks TLS 1.2 and 1.3 only. A *minimum* of TLS 1.0 or 1.1 (ESPv2's
//! `--ssl_minimum_protocol`, or those versions in ESP's `--ssl_protocols` next to newer ones) is
//! raised to TLS 1.2 with a warning at start: the flag asks for "at least this", and every
//! connection Portico accepts still is, so an ESPv2 command line keeps working; only clients that
//! cannot speak TLS 1.2 fail their handshake (in 2026 they are rare, and TLS 1.0/1.1 are
//! deprecated by RFC 8996). A *maximum* below TLS 1.2 cannot be met by any connection, so it is
//! refused with a precise message, and so is a list with no version Portico speaks.
//!
//! `portico espv2`'s parser hands ESPv2's flags to [`from_espv2_flags`] ([`Espv2TlsFlags`]).

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CipherSuite, RootCertStore, SupportedCipherSuite, SupportedProtocolVersion};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest certificate, key or CA bundle file read. A system CA bundle is about 220 KiB; a file
/// larger than this is a wrong path (a disk image, a log), not a bundle.
pub const MAX_PEM_FILE_BYTES: u64 = 4 << 20;

/// ESP's certificate for `--ssl_port` (nginx's `ssl_certificate`).
pub const ESP_SERVER_CERT: &str = "/etc/nginx/ssl/nginx.crt";
/// ESP's key for `--ssl_port`.
pub const ESP_SERVER_KEY: &str = "/etc/nginx/ssl/nginx.key";
/// ESP's client certificate for `https://` backends with `--tls_mutual_auth`.
pub const ESP_BACKEND_CLIENT_CERT: &str = "/etc/nginx/ssl/backend.crt";
/// ESP's client key for `--tls_mutual_auth`.
pub const ESP_BACKEND_CLIENT_KEY: &str = "/etc/nginx/ssl/backend.key";
/// The directory ESP v1 kept its certificates in; ESPv2 names the files in it after ESP's
/// (`nginx.*`, `backend.*`) instead of its own (`server.*`, `client.*`).
const ESP_SSL_DIR: &str = "/etc/nginx/ssl";

/// A start-up problem with a TLS file or setting, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// A TLS flag value that cannot be used, naming the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(pub String);

/// A certificate chain (end-entity first) and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertKeyFiles {
    /// `<dir>/<stem>.crt` and `<dir>/<stem>.key`, ESPv2's layout.
    pub fn in_dir(dir: &Path, stem: &str) -> CertKeyFiles {
        CertKeyFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentity {
    Files(CertKeyFiles),
    /// `--generate_self_signed_cert`: a certificate for `localhost` made at start.
    SelfSigned,
}

/// The TLS versions a side speaks: TLS 1.2, TLS 1.3, or both (never neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersions {
    pub tls1_2: bool,
    pub tls1_3: bool,
}

impl Default for ProtocolVersions {
    fn default() -> Self {
        ProtocolVersions {
            tls1_2: true,
            tls1_3: true,
        }
    }
}

/// A TLS version by name, including those rustls cannot speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Ssl2,
    Ssl3,
    Tls1_0,
    Tls1_1,
    Tls1_2,
    Tls1_3,
}

impl TlsVersion {
    /// ESPv2's spelling (`--ssl_minimum_protocol`), or nginx's for the SSL versions.
    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::Ssl2 => "SSLv2",
            TlsVersion::Ssl3 => "SSLv3",
            TlsVersion::Tls1_0 => "TLSv1.0",
            TlsVersion::Tls1_1 => "TLSv1.1",
            TlsVersion::Tls1_2 => "TLSv1.2",
            TlsVersion::Tls1_3 => "TLSv1.3",
        }
    }

    fn spoken(self) -> bool {
        self >= TlsVersion::Tls1_2
    }

    /// ESPv2's four spellings, exactly (its flag parser's `choices`).
    fn from_espv2(flag: &str, v: &str) -> Result<TlsVersion, FlagError> {
        const ALL: [TlsVersion; 4] = [
            TlsVersion::Tls1_0,
            TlsVersion::Tls1_1,
            TlsVersion::Tls1_2,
            TlsVersion::Tls1_3,
        ];
        if let Some(t) = ALL.iter().find(|t| t.name() == v) {
            return Ok(*t);
        }
        let hint = ALL
            .iter()
            .find(|t| t.name().eq_ignore_ascii_case(v.trim()))
            .map(|t| format!(" (did you mean {}?)", t.name()))
            .unwrap_or_default();
        Err(FlagError(format!(
            "invalid {flag} {v:?}: must be one of TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3{hint}"
        )))
    }

    /// nginx's `ssl_protocols` names, in any case as nginx compares them.
    fn from_nginx(v: &str) -> Result<TlsVersion, FlagError> {
        let t = match v.to_ascii_lowercase().as_str() {
            "sslv2" => TlsVersion::Ssl2,
            "sslv3" => TlsVersion::Ssl3,
            "tlsv1" => TlsVersion::Tls1_0,
            "tlsv1.1" => TlsVersion::Tls1_1,
            "tlsv1.2" => TlsVersion::Tls1_2,
            "tlsv1.3" => TlsVersion::Tls1_3,
            "tlsv1.0" => {
                return Err(FlagError(format!(
                    "invalid --ssl_protocols {v:?}: nginx spells TLS 1.0 \"TLSv1\""
                )))
            }
            _ => {
                return Err(FlagError(format!(
                    "invalid --ssl_protocols {v:?}: must be SSLv2, SSLv3, TLSv1, TLSv1.1, TLSv1.2 \
                     or TLSv1.3"
                )))
            }
        };
        Ok(t)
    }
}

impl ProtocolVersions {
    fn from_set(tls1_2: bool, tls1_3: bool) -> Option<ProtocolVersions> {
        (tls1_2 || tls1_3).then_some(ProtocolVersions { tls1_2, tls1_3 })
    }

    /// ESPv2's `--ssl_minimum_protocol` and `--ssl_maximum_protocol` (`TLSv1.0` … `TLSv1.3`,
    /// exactly so spelt; unset: no bound). Returns the versions and, when the minimum asked
    /// for a version rustls cannot speak, the warning to log at start.
    pub fn from_espv2_range(
        min: Option<&str>,
        max: Option<&str>,
    ) -> Result<(ProtocolVersions, Option<String>), FlagError> {
        let lo = min
            .map(|v| TlsVersion::from_espv2("--ssl_minimum_protocol", v))
            .transpose()?;
        let hi = max
            .map(|v| TlsVersion::from_espv2("--ssl_maximum_protocol", v))
            .transpose()?;
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo > hi {
                return Err(FlagError(format!(
                    "--ssl_minimum_protocol={} is above --ssl_maximum_protocol={}",
                    lo.name(),
                    hi.name()
                )));
            }
        }
        if let Some(hi) = hi.filter(|h| !h.spoken()) {
            return Err(FlagError(format!(
                "--ssl_maximum_protocol={} cannot be honoured: Portico speaks TLS 1.2 and 1.3 \
                 only (rustls), so no connection could be made; use TLSv1.2 or TLSv1.3",
                hi.name()
            )));
        }
        let warning = lo.filter(|l| !l.spoken()).map(|l| {
            format!(
                "--ssl_minimum_protocol={}: Portico speaks TLS 1.2 and 1.3 only (rustls); the \
                 minimum is TLS 1.2, and clients limited to older versions fail their handshake",
                l.name()
            )
        });
        let lo = lo.unwrap_or(TlsVersion::Tls1_2);
        let hi = hi.unwrap_or(TlsVersion::Tls1_3);
        let within = |v| lo <= v && v <= hi;
        let versions = Self::from_set(within(TlsVersion::Tls1_2), within(TlsVersion::Tls1_3))
            .ok_or_else(|| FlagError("no TLS version left between the bounds".into()))?;
        Ok((versions, warning))
    }

    /// ESP's `--ssl_protocols` (repeatable, nginx's `ssl_protocols` names in any case, several
    /// per value separated by spaces): exactly the versions named. Versions rustls cannot speak
    /// are dropped with a warning; a list with none it can is refused. Empty: both.
    pub fn from_nginx_list(
        values: &[String],
    ) -> Result<(ProtocolVersions, Option<String>), FlagError> {
        let mut named = Vec::new();
        let mut dropped: Vec<&str> = Vec::new();
        for v in values.iter().flat_map(|v| v.split_whitespace()) {
            let version = TlsVersion::from_nginx(v)?;
            // Said back as written, which is how the operator will look for it.
            if !version.spoken() && !dropped.iter().any(|d| d.eq_ignore_ascii_case(v)) {
                dropped.push(v);
            }
            named.push(version);
        }
        if named.is_empty() {
            if values.is_empty() {
                return Ok((ProtocolVersions::default(), None));
            }
            return Err(FlagError("--ssl_protocols names no protocol".into()));
        }
        let versions = Self::from_set(
            named.contains(&TlsVersion::Tls1_2),
            named.contains(&TlsVersion::Tls1_3),
        )
        .ok_or_else(|| {
            FlagError(format!(
                "--ssl_protocols {} cannot be honoured: Portico speaks TLSv1.2 and TLSv1.3 only \
                 (rustls); name at least one of them",
                dropped.join(" ")
            ))
        })?;
        let warning = (!dropped.is_empty()).then(|| {
            format!(
                "--ssl_protocols: {} not available (Portico speaks TLS 1.2 and 1.3 only); \
                 clients limited to {} fail their handshake",
                dropped.join(", "),
                if dropped.len() == 1 { "it" } else { "them" }
            )
        });
        Ok((versions, warning))
    }

    fn rustls(self) -> Vec<&'static SupportedProtocolVersion> {
        let mut v = Vec::with_capacity(2);
        if self.tls1_3 {
            v.push(&rustls::version::TLS13);
        }
        if self.tls1_2 {
            v.push(&rustls::version::TLS12);
        }
        v
    }
}

/// The TLS 1.2 suites rustls (with *ring*) implements, by BoringSSL/OpenSSL name (what Envoy,
/// hence ESPv2, takes) and IANA name.
const TLS12_SUITES: [(&str, CipherSuite); 6] = [
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// TLS 1.3's suites: not choosable in Envoy either; all three are always on.
const TLS13_SUITE_NAMES: [&str; 3] = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// Suites BoringSSL knows (several are in Envoy's default list) that rustls does not implement.
const UNIMPLEMENTED_SUITES: [&str; 14] = [
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
    "DES-CBC3-SHA",
];

fn suite_by_name(name: &str) -> Option<CipherSuite> {
    TLS12_SUITES
        .iter()
        .find(|(n, s)| *n == name || s.as_str() == Some(name))
        .map(|(_, s)| *s)
}

/// Parses a cipher suite list as ESPv2 passes it to Envoy (`--ssl_server_cipher_suites`,
/// `--ssl_backend_client_cipher_suites`): names separated by `,` (or `:`, `;`, spaces, as
/// BoringSSL also separates them), in order of preference. An Envoy equal-preference group
/// `[A|B]` counts as `A,B`. Names are BoringSSL's (`ECDHE-ECDSA-AES128-GCM-SHA256`) or IANA's
/// (`TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`), compared exactly as BoringSSL does. The list
/// chooses among TLS 1.2 suites only; each name rustls cannot do is refused with the reason.
/// An empty value is no list (ESPv2 ignores it).
pub fn parse_cipher_suites(flag: &str, value: &str) -> Result<Option<Vec<CipherSuite>>, FlagError> {
    let mut out: Vec<CipherSuite> = Vec::new();
    let mut any = false;
    let names = value
        .split(|c: char| matches!(c, ',' | ':' | ';' | '|' | '[' | ']') || c.is_whitespace())
        .filter(|n| !n.is_empty());
    let available = || {
        TLS12_SUITES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for name in names {
        any = true;
        if let Some(s) = suite_by_name(name) {
            if !out.contains(&s) {
                out.push(s);
            }
            continue;
        }
        let why = if TLS13_SUITE_NAMES.contains(&name) {
            "TLS 1.3 suites cannot be chosen (as in ESPv2's Envoy): all three are always on; \
             list TLS 1.2 suites only"
                .to_string()
        } else if UNIMPLEMENTED_SUITES.contains(&name) {
            format!(
                "rustls does not implement it (no CBC-mode, static-RSA or PSK suites); the TLS \
                 1.2 suites Portico has are {}",
                available()
            )
        } else if name.starts_with(['!', '+', '-', '@'])
            || name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            format!(
                "cipher string operators and aliases (!, +, -, ALL, HIGH, ...) are not \
                 supported; list suite names, from {}",
                available()
            )
        } else if let Some((n, _)) = TLS12_SUITES.iter().find(|(n, s)| {
            n.eq_ignore_ascii_case(name) || s.as_str().is_some_and(|i| i.eq_ignore_ascii_case(name))
        }) {
            format!("names are case-sensitive (did you mean {n}?)")
        } else {
            format!(
                "unknown cipher suite; the TLS 1.2 suites Portico has are {}",
                available()
            )
        };
        return Err(FlagError(format!("invalid {flag} entry {name:?}: {why}")));
    }
    if !any {
        if value.trim().is_empty() {
            return Ok(None);
        }
        return Err(FlagError(format!("{flag} {value:?} names no cipher suite")));
    }
    Ok(Some(out))
}

/// Downstream TLS: the serving certificate, client certificates, versions and suites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub identity: ServerIdentity,
    /// Downstream mTLS: a PEM bundle of CA certificates. Every client must present a
    /// certificate issued by one of them, or its handshake fails (ESPv2's
    /// `require_client_certificate`).
    pub client_ca: Option<PathBuf>,
    pub versions: ProtocolVersions,
    /// TLS 1.2 suites in order of preference (the server's order then wins); `None`: rustls's.
    pub cipher_suites: Option<Vec<CipherSuite>>,
    /// Logged once at start (a version asked for that rustls cannot speak).
    pub warnings: Vec<String>,
}

impl Default for ServerTls {
    /// ESP's: `/etc/nginx/ssl/nginx.{crt,key}`, TLS 1.2 and 1.3, no client certificates.
    fn default() -> Self {
        ServerTls {
            identity: ServerIdentity::Files(CertKeyFiles {
                cert: ESP_SERVER_CERT.into(),
                key: ESP_SERVER_KEY.into(),
            }),
            client_ca: None,
            versions: ProtocolVersions::default(),
            cipher_suites: None,
            warnings: Vec::new(),
        }
    }
}

/// Which certificates a backend's may chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendRoots {
    /// Mozilla's root program (built in) and, optionally, the certificates of a PEM bundle
    /// (Portico's `--backend_ca_cert_path`).
    BuiltIn { extra: Option<PathBuf> },
    /// Only the certificates of this PEM bundle (ESPv2's `--ssl_backend_client_root_certs_file`).
    Only(PathBuf),
}

/// Upstream TLS, for `https://` backends (and HTTP/2 over TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    pub roots: BackendRoots,
    /// Upstream mTLS: the certificate presented to backends that ask for one.
    pub client_cert: Option<CertKeyFiles>,
    /// TLS 1.2 suites offered, in order; `None`: rustls's.
    pub cipher_suites: Option<Vec<CipherSuite>>,
}

impl Default for BackendTls {
    fn default() -> Self {
        BackendTls {
            roots: BackendRoots::BuiltIn { extra: None },
            client_cert: None,
            cipher_suites: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

/// Why a path could not be opened, said about the path itself or the directory above it.
fn open_error(what: &str, path: &Path, e: &std::io::Error) -> TlsError {
    if matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    ) {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            match std::fs::metadata(dir) {
                Err(_) => {
                    return TlsError(format!(
                        "{what} {}: the directory {} does not exist",
                        path.display(),
                        dir.display()
                    ))
                }
                Ok(m) if !m.is_dir() => {
                    return TlsError(format!(
                        "{what} {}: {} is not a directory",
                        path.display(),
                        dir.display()
                    ))
                }
                Ok(_) => {}
            }
        }
        return TlsError(format!("{what} {}: no such file", path.display()));
    }
    TlsError(format!("cannot read {what} {}: {e}", path.display()))
}

/// A regular file of at most [`MAX_PEM_FILE_BYTES`], read whole.
fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|e| open_error(what, path, &e))?;
    if !meta.is_file() {
        return Err(TlsError(format!(
            "{what} {}: not a regular file{}",
            path.display(),
            if meta.is_dir() { " (a directory)" } else { "" }
        )));
    }
    let too_big = || {
        TlsError(format!(
            "{what} {}: larger than {} MiB, too large for a PEM file",
            path.display(),
            MAX_PEM_FILE_BYTES >> 20
        ))
    };
    if meta.len() > MAX_PEM_FILE_BYTES {
        return Err(too_big());
    }
    let file = std::fs::File::open(path).map_err(|e| open_error(what, path, &e))?;
    let mut buf = Vec::new();
    // Bounded again: the file may grow between the size check and the read.
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))?;
    if buf.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(too_big());
    }
    Ok(buf)
}

/// What a PEM file holds.
#[derive(Default)]
struct Pem {
    certs: Vec<CertificateDer<'static>>,
    keys: Vec<PrivateKeyDer<'static>>,
    encrypted_key: bool,
}

fn read_pem(what: &str, path: &Path) -> Result<Pem, TlsError> {
    let bytes = read_file(what, path)?;
    let mut pem = Pem::default();
    let mut rd = bytes.as_slice();
    loop {
        match rustls_pemfile::read_one(&mut rd) {
            Ok(None) => break,
            Ok(Some(item)) => match item {
                rustls_pemfile::Item::X509Certificate(c) => pem.certs.push(c),
                rustls_pemfile::Item::Pkcs1Key(k) => pem.keys.push(k.into()),
                rustls_pemfile::Item::Pkcs8Key(k) => pem.keys.push(k.into()),
                rustls_pemfile::Item::Sec1Key(k) => pem.keys.push(k.into()),
                _ => {}
            },
            Err(e) => {
                return Err(TlsError(format!(
                    "{what} {}: not valid PEM: {e}",
                    path.display()
                )))
            }
        }
    }
    // Sections rustls cannot use are skipped by the reader; an encrypted key is worth naming.
    pem.encrypted_key = contains(&bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(&bytes, b"Proc-Type: 4,ENCRYPTED");
    Ok(pem)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The certificates of a PEM file, each checked to be X.509.
fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(what, path)?;
    if pem.certs.is_empty() {
        let held = if !pem.keys.is_empty() || pem.encrypted_key {
            " (it holds a private key: are the certificate and key paths swapped?)"
        } else {
            ""
        };
        return Err(TlsError(format!(
            "{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it{held}",
            path.display()
        )));
    }
    for (i, c) in pem.certs.iter().enumerate() {
        rustls::server::ParsedCertificate::try_from(c).map_err(|e| {
            TlsError(format!(
                "{what} {}: certificate {} of {} is not a valid X.509 certificate: {e}",
                path.display(),
                i + 1,
                pem.certs.len()
            ))
        })?;
    }
    Ok(pem.certs)
}

/// The one private key of a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "private key";
    let mut pem = read_pem(what, path)?;
    match pem.keys.len() {
        1 => Ok(pem.keys.remove(0)),
        0 if pem.encrypted_key => Err(TlsError(format!(
            "{what} {}: the key is encrypted; Portico cannot ask for a passphrase, store it \
             decrypted (e.g. `openssl pkey -in KEY -out KEY.plain`) with restricted permissions",
            path.display()
        ))),
        0 => Err(TlsError(format!(
            "{what} {}: no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC \
             PRIVATE KEY) in it{}",
            path.display(),
            if pem.certs.is_empty() {
                ""
            } else {
                " (it holds a certificate: are the certificate and key paths swapped?)"
            }
        ))),
        n => Err(TlsError(format!(
            "{what} {}: {n} private keys in it; give exactly one",
            path.display()
        ))),
    }
}

/// A certificate chain and its key from files, checked to belong together.
fn load_identity(
    files: &CertKeyFiles,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = read_certs("certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError(format!("private key {}: {e}", files.key.display())))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError(format!(
                "private key {} does not belong to the certificate {} (their public keys differ)",
                files.key.display(),
                files.cert.display()
            )))
        }
        Err(e) => {
            return Err(TlsError(format!(
                "certificate {}: {e}",
                files.cert.display()
            )))
        }
    }
    Ok((certs, key))
}

/// A root store of the certificates in a PEM bundle, added to `roots`.
fn add_bundle(what: &str, path: &Path, roots: &mut RootCertStore) -> Result<(), TlsError> {
    let certs = read_certs(what, path)?;
    let n = certs.len();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| {
            TlsError(format!(
                "{what} {}: certificate {} of {n} cannot be a trust anchor: {e}",
                path.display(),
                i + 1
            ))
        })?;
    }
    Ok(())
}

/// rustls's *ring* provider, its TLS 1.2 suites narrowed to `suites` (in that order) when given.
fn provider(suites: Option<&[CipherSuite]>) -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    if let Some(wanted) = suites {
        let all = std::mem::take(&mut p.cipher_suites);
        let mut chosen: Vec<SupportedCipherSuite> = all
            .iter()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
            .copied()
            .collect();
        for w in wanted {
            if let Some(s) = all.iter().find(|s| s.suite() == *w) {
                chosen.push(*s);
            }
        }
        p.cipher_suites = chosen;
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Configurations.

/// The serving side's rustls configuration (ALPN `h2`, `http/1.1`), reading every file it names.
pub fn server_config(t: &ServerTls) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(provider(t.cipher_suites.as_deref()));
    let (certs, key) = match &t.identity {
        ServerIdentity::Files(files) => load_identity(files, &provider)?,
        ServerIdentity::SelfSigned => {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .map_err(|e| TlsError(format!("cannot generate a self-signed certificate: {e}")))?;
            let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der())
                .map_err(|e| TlsError(format!("self-signed certificate's key: {e}")))?;
            (vec![ck.cert.der().clone()], key)
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&t.versions.rustls())
        .map_err(|e| TlsError(format!("TLS versions and cipher suites: {e}")))?;
    let builder = match &t.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            add_bundle("client CA bundle", path, &mut roots)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError(format!("client CA bundle {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError(match &t.identity {
            ServerIdentity::Files(f) => format!(
                "certificate {} and key {}: {e}",
                f.cert.display(),
                f.key.display()
            ),
            ServerIdentity::SelfSigned => format!("self-signed certificate: {e}"),
        })
    })?;
    // A chosen suite list is an order of preference, as BoringSSL servers apply it.
    cfg.ignore_client_order = t.cipher_suites.is_some();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The backend side's rustls configuration, without ALPN (each backend client sets what it
/// offers), reading every file it names.
pub fn client_config(t: &BackendTls) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(provider(t.cipher_suites.as_deref()));
    let mut roots = RootCertStore::empty();
    match &t.roots {
        BackendRoots::BuiltIn { extra } => {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(path) = extra {
                add_bundle("backend CA bundle", path, &mut roots)?;
            }
        }
        BackendRoots::Only(path) => add_bundle("backend root certificates", path, &mut roots)?,
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS versions and cipher suites: {e}")))?
        .with_root_certificates(roots);
    match &t.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some(files) => {
            let (certs, key) = load_identity(files, &provider)?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError(format!(
                    "client certificate {} and key {}: {e}",
                    files.cert.display(),
                    files.key.display()
                ))
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ESPv2's flags.

/// ESPv2's TLS flags as `portico espv2` receives them (`start_proxy.py`'s names), values as
/// given. An empty value counts as not given, as in ESPv2.
#[derive(Debug, Clone, Default)]
pub struct Espv2TlsFlags {
    /// `--ssl_server_cert_path`: a directory with `server.crt` and `server.key` (`nginx.crt` and
    /// `nginx.key` when the path contains `/etc/nginx/ssl`). Given: the listener speaks TLS only.
    pub ssl_server_cert_path: Option<String>,
    /// `--ssl_server_root_cert_path`: a PEM *file* of CA certificates; clients must present a
    /// certificate issued by one of them.
    pub ssl_server_root_cert_path: Option<String>,
    /// `--ssl_server_cipher_suites`: see [`parse_cipher_suites`].
    pub ssl_server_cipher_suites: Option<String>,
    /// `--ssl_minimum_protocol`, `--ssl_maximum_protocol`: `TLSv1.0` … `TLSv1.3`.
    pub ssl_minimum_protocol: Option<String>,
    pub ssl_maximum_protocol: Option<String>,
    /// `--generate_self_signed_cert`: a certificate for `localhost` made at start; the listener
    /// speaks TLS only.
    pub generate_self_signed_cert: bool,
    /// `--ssl_backend_client_cert_path`: a directory with `client.crt` and `client.key`
    /// (`backend.*` under `/etc/nginx/ssl`) presented to backends.
    pub ssl_backend_client_cert_path: Option<String>,
    /// `--ssl_backend_client_root_certs_file`: the only trust anchors for backends. Unset: the
    /// built-in Mozilla roots (ESPv2: the system's `/etc/ssl/certs/ca-certificates.crt`, which on
    /// Debian is the same program's roots; pass that file to trust what was added to it).
    pub ssl_backend_client_root_certs_file: Option<String>,
    /// `--ssl_backend_client_cipher_suites`: see [`parse_cipher_suites`].
    pub ssl_backend_client_cipher_suites: Option<String>,
    /// Deprecated ESP v1 forms ESPv2 still takes. `--ssl_port` was given (the parser turns the
    /// port into the listener port): certificates from `/etc/nginx/ssl/nginx.{crt,key}`.
    pub ssl_port: bool,
    /// `-t`/`--tls_mutual_auth`: `/etc/nginx/ssl/backend.{crt,key}` presented to backends.
    pub tls_mutual_auth: bool,
    /// `--ssl_protocols` (repeatable): its lowest and highest names become the minimum and
    /// maximum, as ESPv2 sorts them.
    pub ssl_protocols: Vec<String>,
    /// `--ssl_client_cert_path`, `--ssl_client_root_certs_file`: older names of
    /// `--ssl_backend_client_cert_path` and `--ssl_backend_client_root_certs_file`.
    pub ssl_client_cert_path: Option<String>,
    pub ssl_client_root_certs_file: Option<String>,
    /// `--enable_grpc_backend_ssl` with `--grpc_backend_ssl_root_certs_file` (default
    /// `/etc/nginx/trusted-ca-certificates.crt`): that file as the backends' trust anchors.
    pub enable_grpc_backend_ssl: bool,
    pub grpc_backend_ssl_root_certs_file: Option<String>,
}

/// What ESPv2's TLS flags set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Espv2Tls {
    /// `Some`: the listener speaks TLS only, with these settings (in `Settings::server_tls`,
    /// the listener's port as `Settings::ssl_port`, no plain `http_port`).
    pub server: Option<ServerTls>,
    /// `Settings::backend_tls`.
    pub backend: BackendTls,
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// ESPv2's TLS flags to Portico's settings, with `start_proxy.py`'s refusals of deprecated flags
/// next to their replacements. Reads no file (that happens at start, [`server_config`] and
/// [`client_config`]).
///
/// One deliberate difference: ESPv2 ignores `--ssl_server_root_cert_path` when the listener has
/// no TLS (its integration tests serve plain HTTP then), which leaves clients unauthenticated
/// that the operator meant to authenticate; Portico refuses that combination.
pub fn from_espv2_flags(f: &Espv2TlsFlags) -> Result<Espv2Tls, FlagError> {
    let conflict = |a: &str, b: &str, why: &str| Err(FlagError(format!("{a} and {b}: {why}")));
    let server_dir = given(&f.ssl_server_cert_path);
    if f.ssl_port && server_dir.is_some() {
        return conflict(
            "--ssl_port",
            "--ssl_server_cert_path",
            "--ssl_port is deprecated; use --ssl_server_cert_path only",
        );
    }
    if f.generate_self_signed_cert && server_dir.is_some() {
        return conflict(
            "--generate_self_signed_cert",
            "--ssl_server_cert_path",
            "they cannot be used together",
        );
    }
    let backend_dir = given(&f.ssl_backend_client_cert_path);
    let old_backend_dir = given(&f.ssl_client_cert_path);
    if f.tls_mutual_auth && (backend_dir.is_some() || old_backend_dir.is_some()) {
        return conflict(
            "--tls_mutual_auth",
            "--ssl_backend_client_cert_path",
            "--tls_mutual_auth is deprecated; use --ssl_backend_client_cert_path only",
        );
    }
    if backend_dir.is_some() && old_backend_dir.is_some() {
        return conflict(
            "--ssl_client_cert_path",
            "--ssl_backend_client_cert_path",
            "--ssl_client_cert_path is the old name; use --ssl_backend_client_cert_path only",
        );
    }
    let roots_file = given(&f.ssl_backend_client_root_certs_file);
    let old_roots_file = given(&f.ssl_client_root_certs_file);
    if roots_file.is_some() && old_roots_file.is_some() {
        return conflict(
            "--ssl_client_root_certs_file",
            "--ssl_backend_client_root_certs_file",
            "--ssl_client_root_certs_file is the old name; use \
             --ssl_backend_client_root_certs_file only",
        );
    }
    if f.enable_grpc_backend_ssl && (roots_file.is_some() || old_roots_file.is_some()) {
        return conflict(
            "--enable_grpc_backend_ssl",
            "--ssl_backend_client_root_certs_file",
            "--enable_grpc_backend_ssl is deprecated; use --ssl_backend_client_root_certs_file \
             only",
        );
    }
    let (min, max) = (
        given(&f.ssl_minimum_protocol),
        given(&f.ssl_maximum_protocol),
    );
    let protocols: Vec<&str> = f.ssl_protocols.iter().map(String::as_str).collect();
    if !protocols.is_empty() && (min.is_some() || max.is_some()) {
        return conflict(
            "--ssl_protocols",
            "--ssl_minimum_protocol/--ssl_maximum_protocol",
            "--ssl_protocols is deprecated; use --ssl_minimum_protocol and --ssl_maximum_protocol",
        );
    }

    let identity = if let Some(dir) = server_dir {
        let stem = if dir.contains(ESP_SSL_DIR) {
            "nginx"
        } else {
            "server"
        };
        Some(ServerIdentity::Files(CertKeyFiles::in_dir(
            Path::new(dir),
            stem,
        )))
    } else if f.ssl_port {
        Some(ServerIdentity::Files(CertKeyFiles::in_dir(
            Path::new(ESP_SSL_DIR),
            "nginx",
        )))
    } else if f.generate_self_signed_cert {
        Some(ServerIdentity::SelfSigned)
    } else {
        None
    };
    let client_ca = given(&f.ssl_server_root_cert_path).map(PathBuf::from);
    let server = match identity {
        None => {
            if client_ca.is_some() {
                return Err(FlagError(
                    "--ssl_server_root_cert_path needs --ssl_server_cert_path (or \
                     --generate_self_signed_cert): without TLS on the listener no client \
                     certificate can be asked for, and clients would go unauthenticated"
                        .into(),
                ));
            }
            None
        }
        Some(identity) => {
            let (versions, warning) = if protocols.is_empty() {
                ProtocolVersions::from_espv2_range(min, max)?
            } else {
                espv2_ssl_protocols(&protocols)?
            };
            let cipher_suites = match given(&f.ssl_server_cipher_suites) {
                Some(v) => parse_cipher_suites("--ssl_server_cipher_suites", v)?,
                None => None,
            };
            Some(ServerTls {
                identity,
                client_ca,
                versions,
                cipher_suites,
                warnings: warning.into_iter().collect(),
            })
        }
    };

    let client_dir = backend_dir
        .or(old_backend_dir)
        .or(f.tls_mutual_auth.then_some(ESP_SSL_DIR));
    let client_cert = client_dir.map(|dir| {
        let stem = if dir.contains(ESP_SSL_DIR) {
            "backend"
        } else {
            "client"
        };
        CertKeyFiles::in_dir(Path::new(dir), stem)
    });
    let grpc_roots = f.enable_grpc_backend_ssl.then(|| {
        given(&f.grpc_backend_ssl_root_certs_file)
            .unwrap_or("/etc/nginx/trusted-ca-certificates.crt")
    });
    let roots = match roots_file.or(old_roots_file).or(grpc_roots) {
        Some(file) => BackendRoots::Only(PathBuf::from(file)),
        None => BackendRoots::BuiltIn { extra: None },
    };
    let cipher_suites = match given(&f.ssl_backend_client_cipher_suites) {
        Some(v) => parse_cipher_suites("--ssl_backend_client_cipher_suites", v)?,
        None => None,
    };
    Ok(Espv2Tls {
        server,
        backend: BackendTls {
            roots,
            client_cert,
            cipher_suites,
        },
    })
}

/// ESPv2's handling of the deprecated `--ssl_protocols`: the names sorted, the first as the
/// minimum and the last as the maximum. nginx's `TLSv1` is read as `TLSv1.0` (ESPv2 would
/// silently drop that bound).
fn espv2_ssl_protocols(names: &[&str]) -> Result<(ProtocolVersions, Option<String>), FlagError> {
    let mut versions = Vec::new();
    for n in names.iter().flat_map(|n| n.split_whitespace()) {
        let v = match TlsVersion::from_nginx(n) {
            Ok(v) => v,
            Err(_) => TlsVersion::from_espv2("--ssl_protocols", n)?,
        };
        versions.push(v);
    }
    let (Some(lo), Some(hi)) = (versions.iter().min(), versions.iter().max()) else {
        return Err(FlagError("--ssl_protocols names no protocol".into()));
    };
    if !hi.spoken() {
        return Err(FlagError(format!(
            "--ssl_protocols up to {} cannot be honoured: Portico speaks TLS 1.2 and 1.3 only \
             (rustls); name TLSv1.2 or TLSv1.3",
            hi.name()
        )));
    }
    let warning = (!lo.spoken()).then(|| {
        format!(
            "--ssl_protocols from {}: Portico speaks TLS 1.2 and 1.3 only (rustls); the minimum \
             is TLS 1.2, and clients limited to older versions fail their handshake",
            lo.name()
        )
    });
    let lo = (*lo).max(TlsVersion::Tls1_2);
    let versions = ProtocolVersions {
        tls1_2: lo <= TlsVersion::Tls1_2,
        tls1_3: *hi == TlsVersion::Tls1_3,
    };
    Ok((versions, warning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    struct Made {
        cert_pem: String,
        key_pem: String,
    }

    fn make(name: &str) -> Made {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Made {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn files(dir: &Path, cert: &str, key: &str) -> CertKeyFiles {
        let f = CertKeyFiles::in_dir(dir, "server");
        std::fs::write(&f.cert, cert).unwrap();
        std::fs::write(&f.key, key).unwrap();
        f
    }

    fn server(f: CertKeyFiles) -> ServerTls {
        ServerTls {
            identity: ServerIdentity::Files(f),
            ..ServerTls::default()
        }
    }

    fn server_err(f: CertKeyFiles) -> String {
        server_config(&server(f)).unwrap_err().0
    }

    #[test]
    fn a_certificate_and_its_key_make_a_server_and_a_client_config() {
        let dir = tempfile::tempdir().unwrap();
        let m = make("localhost");
        let f = files(dir.path(), &m.cert_pem, &m.key_pem);
        let cfg = server_config(&server(f.clone())).unwrap();
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(!cfg.ignore_client_order);
        let cfg = client_config(&BackendTls {
            client_cert: Some(f),
            ..BackendTls::default()
        })
        .unwrap();
        assert!(cfg.client_auth_cert_resolver.has_certs());
        assert!(!client_config(&BackendTls::default())
            .unwrap()
            .client_auth_cert_resolver
            .has_certs());
        // A chain: leaf first, then more certificates.
        let chain = format!("{}{}", m.cert_pem, make("intermediate").cert_pem);
        let f = files(dir.path(), &chain, &m.key_pem);
        assert!(server_config(&server(f)).is_ok());
    }

    #[test]
    fn missing_files_and_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let nowhere = dir.path().join("nowhere");
        let e = server_err(CertKeyFiles::in_dir(&nowhere, "server"));
        assert_eq!(
            e,
            format!(
                "certificate {}: the directory {} does not exist",
                nowhere.join("server.crt").display(),
                nowhere.display()
            )
        );
        let e = server_err(CertKeyFiles::in_dir(dir.path(), "server"));
        assert_eq!(
            e,
            format!(
                "certificate {}: no such file",
                dir.path().join("server.crt").display()
            )
        );
        // The "directory" is a file.
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = server_err(CertKeyFiles::in_dir(&file, "server"));
        assert!(
            e.ends_with(&format!("{} is not a directory", file.display())),
            "{e}"
        );
        // The certificate path is a directory.
        std::fs::create_dir(dir.path().join("server.crt")).unwrap();
        let e = server_err(CertKeyFiles::in_dir(dir.path(), "server"));
        assert!(e.ends_with("not a regular file (a directory)"), "{e}");
        // A device is not a regular file either (and /dev/zero would never end).
        let e = read_file("certificate", Path::new("/dev/zero"))
            .unwrap_err()
            .0;
        assert_eq!(e, "certificate /dev/zero: not a regular file");
    }

    #[test]
    fn an_unreadable_directory_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = make("localhost");
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        let f = files(&locked, &m.cert_pem, &m.key_pem);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        // Root reads through permissions; the check only means something for other users.
        let readable = std::fs::metadata(&f.cert).is_ok();
        let result = server_config(&server(f.clone()));
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        if readable {
            assert!(result.is_ok());
            return;
        }
        let e = result.unwrap_err().0;
        assert!(
            e.starts_with(&format!("cannot read certificate {}: ", f.cert.display())),
            "{e}"
        );
        assert!(e.contains("ermission denied"), "{e}");
    }

    #[test]
    fn huge_files_are_refused_before_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let m = make("localhost");
        let f = files(dir.path(), &m.cert_pem, &m.key_pem);
        let big = std::fs::File::create(&f.cert).unwrap();
        big.set_len(MAX_PEM_FILE_BYTES + 1).unwrap();
        let e = server_err(f.clone());
        assert_eq!(
            e,
            format!(
                "certificate {}: larger than 4 MiB, too large for a PEM file",
                f.cert.display()
            )
        );
        // Exactly the limit is read (and then found to hold no certificate).
        big.set_len(MAX_PEM_FILE_BYTES).unwrap();
        assert!(server_err(f).contains("no PEM certificate"));
    }

    #[test]
    fn pem_without_the_right_blocks_or_with_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = make("localhost");
        let other = make("other");
        let cases: [(&str, &str, &str); 9] = [
            (
                "",
                &m.key_pem,
                "certificate {cert}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            ),
            (
                "just text\n",
                &m.key_pem,
                "certificate {cert}: no PEM certificate",
            ),
            (
                &m.key_pem,
                &m.key_pem,
                "are the certificate and key paths swapped?",
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
                &m.key_pem,
                "certificate {cert}: not valid PEM: ",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
                &m.key_pem,
                "certificate {cert}: certificate 1 of 1 is not a valid X.509 certificate",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nMIIB\n",
                &m.key_pem,
                "certificate {cert}: not valid PEM: ",
            ),
            (&m.cert_pem, "", "private key {key}: no PEM private key"),
            (
                &m.cert_pem,
                &m.cert_pem,
                "are the certificate and key paths swapped?",
            ),
            (
                &m.cert_pem,
                "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n",
                "private key {key}: ",
            ),
        ];
        for (cert, key, want) in cases {
            let f = files(dir.path(), cert, key);
            let want = want
                .replace("{cert}", &f.cert.display().to_string())
                .replace("{key}", &f.key.display().to_string());
            let e = server_err(f);
            assert!(e.contains(&want), "want {want:?} in {e:?}");
        }
        // A key that is not the certificate's.
        let f = files(dir.path(), &m.cert_pem, &other.key_pem);
        assert_eq!(
            server_err(f.clone()),
            format!(
                "private key {} does not belong to the certificate {} (their public keys differ)",
                f.key.display(),
                f.cert.display()
            )
        );
        // The same for the backend client certificate.
        let e = client_config(&BackendTls {
            client_cert: Some(f),
            ..BackendTls::default()
        })
        .unwrap_err()
        .0;
        assert!(e.contains("does not belong to the certificate"), "{e}");
        // Two keys: which one was meant is not guessed.
        let f = files(
            dir.path(),
            &m.cert_pem,
            &format!("{}{}", m.key_pem, other.key_pem),
        );
        assert!(server_err(f).contains("2 private keys in it"));
        // An encrypted key is named as such.
        let f = files(
            dir.path(),
            &m.cert_pem,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        assert!(server_err(f).contains("the key is encrypted"));
    }

    #[test]
    fn ca_bundles_are_checked_certificate_by_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let m = make("localhost");
        let f = files(dir.path(), &m.cert_pem, &m.key_pem);
        let bundle = dir.path().join("ca.pem");
        let with_ca = |ca: &str| {
            std::fs::write(&bundle, ca).unwrap();
            let t = ServerTls {
                client_ca: Some(bundle.clone()),
                ..server(f.clone())
            };
            let b = BackendTls {
                roots: BackendRoots::Only(bundle.clone()),
                ..BackendTls::default()
            };
            (server_config(&t).map(|_| ()), client_config(&b).map(|_| ()))
        };
        let (s, c) = with_ca(&m.cert_pem);
        assert!(s.is_ok() && c.is_ok());
        let (s, c) = with_ca("nothing here");
        assert_eq!(
            s.unwrap_err().0,
            format!(
                "client CA bundle {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
                bundle.display()
            )
        );
        assert!(c.unwrap_err().0.starts_with("backend root certificates "));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
        let (s, _) = with_ca(&format!("{}{garbage}", m.cert_pem));
        assert!(s
            .unwrap_err()
            .0
            .contains("certificate 2 of 2 is not a valid X.509 certificate"));
        // The extra bundle beside the built-in roots too.
        std::fs::write(&bundle, "").unwrap();
        let e = client_config(&BackendTls {
            roots: BackendRoots::BuiltIn {
                extra: Some(bundle.clone()),
            },
            ..BackendTls::default()
        })
        .unwrap_err()
        .0;
        assert!(
            e.starts_with(&format!("backend CA bundle {}: ", bundle.display())),
            "{e}"
        );
    }

    #[test]
    fn espv2_version_bounds() {
        let r = |min: Option<&str>, max: Option<&str>| ProtocolVersions::from_espv2_range(min, max);
        let both = ProtocolVersions::default();
        let only12 = ProtocolVersions {
            tls1_2: true,
            tls1_3: false,
        };
        let only13 = ProtocolVersions {
            tls1_2: false,
            tls1_3: true,
        };
        assert_eq!(r(None, None).unwrap(), (both, None));
        assert_eq!(r(Some("TLSv1.2"), None).unwrap(), (both, None));
        assert_eq!(r(Some("TLSv1.3"), None).unwrap(), (only13, None));
        assert_eq!(r(None, Some("TLSv1.2")).unwrap(), (only12, None));
        assert_eq!(r(Some("TLSv1.2"), Some("TLSv1.2")).unwrap(), (only12, None));
        // Old minimums are raised, with a warning.
        for old in ["TLSv1.0", "TLSv1.1"] {
            let (v, w) = r(Some(old), Some("TLSv1.3")).unwrap();
            assert_eq!(v, both);
            let w = w.unwrap();
            assert!(
                w.starts_with(&format!("--ssl_minimum_protocol={old}: ")),
                "{w}"
            );
            assert!(w.contains("the minimum is TLS 1.2"), "{w}");
        }
        // Old maximums cannot be met.
        for old in ["TLSv1.0", "TLSv1.1"] {
            let e = r(None, Some(old)).unwrap_err().0;
            assert_eq!(
                e,
                format!(
                    "--ssl_maximum_protocol={old} cannot be honoured: Portico speaks TLS 1.2 and \
                     1.3 only (rustls), so no connection could be made; use TLSv1.2 or TLSv1.3"
                )
            );
        }
        assert_eq!(
            r(Some("TLSv1.3"), Some("TLSv1.2")).unwrap_err().0,
            "--ssl_minimum_protocol=TLSv1.3 is above --ssl_maximum_protocol=TLSv1.2"
        );
        assert_eq!(
            r(Some("tlsv1.3"), None).unwrap_err().0,
            "invalid --ssl_minimum_protocol \"tlsv1.3\": must be one of TLSv1.0, TLSv1.1, \
             TLSv1.2, TLSv1.3 (did you mean TLSv1.3?)"
        );
        for bad in ["TLSv1", "TLSv1.4", "1.2", "TLSv1.2 ", "TLSv1.2\0", ""] {
            assert!(r(None, Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cipher_suite_lists() {
        let p = |v: &str| parse_cipher_suites("--ssl_server_cipher_suites", v);
        assert_eq!(p("").unwrap(), None);
        assert_eq!(
            p("ECDHE-RSA-AES128-GCM-SHA256,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256").unwrap(),
            Some(vec![
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ])
        );
        // Envoy's equal-preference groups, other separators, repeats.
        assert_eq!(
            p("[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]: ECDHE-ECDSA-AES128-GCM-SHA256 ;")
                .unwrap(),
            Some(vec![
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ])
        );
        for (v, want) in [
            ("AES128-SHA", "rustls does not implement it"),
            (
                "ECDHE-RSA-AES128-GCM-SHA256,AES256-GCM-SHA384",
                "\"AES256-GCM-SHA384\": rustls does not implement it",
            ),
            ("TLS_AES_128_GCM_SHA256", "TLS 1.3 suites cannot be chosen"),
            (
                "ecdhe-rsa-aes128-gcm-sha256",
                "did you mean ECDHE-RSA-AES128-GCM-SHA256?",
            ),
            ("HIGH", "operators and aliases"),
            ("!aNULL", "operators and aliases"),
            ("ECDHE-RSA-AES128-GCM-SHA255", "unknown cipher suite"),
            (",,, ;", "names no cipher suite"),
        ] {
            let e = p(v).unwrap_err().0;
            assert!(e.contains(want), "{v:?}: {e}");
            assert!(e.contains("--ssl_server_cipher_suites"), "{e}");
        }
    }

    #[test]
    fn chosen_suites_narrow_only_tls12_and_keep_their_order() {
        let p = provider(Some(&[
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ]));
        let names: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names[..3]
            .iter()
            .all(|s| s.as_str().is_some_and(|n| n.starts_with("TLS13_"))));
        assert_eq!(
            names[3..],
            [
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            ]
        );
    }

    #[test]
    fn espv2_flags_map_to_settings() {
        let f = |flags: Espv2TlsFlags| from_espv2_flags(&flags);
        // Nothing: no downstream TLS, built-in roots, no client certificate.
        let t = f(Espv2TlsFlags::default()).unwrap();
        assert_eq!(t.server, None);
        assert_eq!(t.backend, BackendTls::default());
        // Empty values are not given.
        let t = f(Espv2TlsFlags {
            ssl_server_cert_path: Some(String::new()),
            ssl_backend_client_root_certs_file: Some(String::new()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((t.server, t.backend), (None, BackendTls::default()));

        let t = f(Espv2TlsFlags {
            ssl_server_cert_path: Some("/certs".into()),
            ssl_server_root_cert_path: Some("/certs/clients.pem".into()),
            ssl_minimum_protocol: Some("TLSv1.3".into()),
            ssl_server_cipher_suites: Some("ECDHE-RSA-AES128-GCM-SHA256".into()),
            ssl_backend_client_cert_path: Some("/mine".into()),
            ssl_backend_client_root_certs_file: Some("/roots.pem".into()),
            ssl_backend_client_cipher_suites: Some("ECDHE-ECDSA-AES256-GCM-SHA384".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            t.server,
            Some(ServerTls {
                identity: ServerIdentity::Files(CertKeyFiles {
                    cert: "/certs/server.crt".into(),
                    key: "/certs/server.key".into()
                }),
                client_ca: Some("/certs/clients.pem".into()),
                versions: ProtocolVersions {
                    tls1_2: false,
                    tls1_3: true
                },
                cipher_suites: Some(vec![CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]),
                warnings: vec![],
            })
        );
        assert_eq!(
            t.backend,
            BackendTls {
                roots: BackendRoots::Only("/roots.pem".into()),
                client_cert: Some(CertKeyFiles {
                    cert: "/mine/client.crt".into(),
                    key: "/mine/client.key".into()
                }),
                cipher_suites: Some(vec![CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]),
            }
        );

        // ESP v1's directory keeps ESP's file names; the deprecated forms map as start_proxy.py.
        let t = f(Espv2TlsFlags {
            ssl_server_cert_path: Some("/etc/nginx/ssl".into()),
            ssl_client_cert_path: Some("/etc/nginx/ssl/".into()),
            ssl_client_root_certs_file: Some("/old.pem".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            t.server.unwrap().identity,
            ServerIdentity::Files(CertKeyFiles {
                cert: "/etc/nginx/ssl/nginx.crt".into(),
                key: "/etc/nginx/ssl/nginx.key".into()
            })
        );
        assert_eq!(
            t.backend.client_cert.unwrap().cert,
            PathBuf::from("/etc/nginx/ssl/backend.crt")
        );
        assert_eq!(t.backend.roots, BackendRoots::Only("/old.pem".into()));
        let t = f(Espv2TlsFlags {
            ssl_port: true,
            tls_mutual_auth: true,
            enable_grpc_backend_ssl: true,
            ssl_protocols: vec!["TLSv1.1".into(), "TLSv1.2".into()],
            ..Default::default()
        })
        .unwrap();
        let server = t.server.unwrap();
        assert_eq!(server.identity, ServerTls::default().identity);
        assert_eq!(
            server.versions,
            ProtocolVersions {
                tls1_2: true,
                tls1_3: false
            }
        );
        assert_eq!(server.warnings.len(), 1);
        assert_eq!(
            t.backend.client_cert.unwrap().key,
            PathBuf::from("/etc/nginx/ssl/backend.key")
        );
        assert_eq!(
            t.backend.roots,
            BackendRoots::Only("/etc/nginx/trusted-ca-certificates.crt".into())
        );
        // ESPv2's --ssl_protocols is a range: the hole is filled.
        let t = f(Espv2TlsFlags {
            generate_self_signed_cert: true,
            ssl_protocols: vec!["TLSv1.3".into(), "TLSv1".into()],
            ..Default::default()
        })
        .unwrap();
        let server = t.server.unwrap();
        assert_eq!(server.identity, ServerIdentity::SelfSigned);
        assert_eq!(server.versions, ProtocolVersions::default());
        assert!(
            server.warnings[0].contains("from TLSv1.0"),
            "{:?}",
            server.warnings
        );
        assert!(f(Espv2TlsFlags {
            ssl_port: true,
            ssl_protocols: vec!["TLSv1 TLSv1.1".into()],
            ..Default::default()
        })
        .unwrap_err()
        .0
        .contains("cannot be honoured"));
    }

    #[test]
    fn espv2_refusals() {
        let s = |v: &str| Some(v.to_string());
        for (flags, want) in [
            (
                Espv2TlsFlags {
                    ssl_server_root_cert_path: s("/clients.pem"),
                    ..Default::default()
                },
                "--ssl_server_root_cert_path needs --ssl_server_cert_path",
            ),
            (
                Espv2TlsFlags {
                    ssl_port: true,
                    ssl_server_cert_path: s("/c"),
                    ..Default::default()
                },
                "--ssl_port and --ssl_server_cert_path",
            ),
            (
                Espv2TlsFlags {
                    generate_self_signed_cert: true,
                    ssl_server_cert_path: s("/c"),
                    ..Default::default()
                },
                "--generate_self_signed_cert and --ssl_server_cert_path",
            ),
            (
                Espv2TlsFlags {
                    tls_mutual_auth: true,
                    ssl_backend_client_cert_path: s("/c"),
                    ..Default::default()
                },
                "--tls_mutual_auth and --ssl_backend_client_cert_path",
            ),
            (
                Espv2TlsFlags {
                    ssl_client_cert_path: s("/a"),
                    ssl_backend_client_cert_path: s("/b"),
                    ..Default::default()
                },
                "--ssl_client_cert_path and --ssl_backend_client_cert_path",
            ),
            (
                Espv2TlsFlags {
                    ssl_client_root_certs_file: s("/a"),
                    ssl_backend_client_root_certs_file: s("/b"),
                    ..Default::default()
                },
                "--ssl_client_root_certs_file and --ssl_backend_client_root_certs_file",
            ),
            (
                Espv2TlsFlags {
                    enable_grpc_backend_ssl: true,
                    ssl_backend_client_root_certs_file: s("/b"),
                    ..Default::default()
                },
                "--enable_grpc_backend_ssl and --ssl_backend_client_root_certs_file",
            ),
            (
                Espv2TlsFlags {
                    ssl_server_cert_path: s("/c"),
                    ssl_protocols: vec!["TLSv1.2".into()],
                    ssl_maximum_protocol: s("TLSv1.3"),
                    ..Default::default()
                },
                "--ssl_protocols and --ssl_minimum_protocol/--ssl_maximum_protocol",
            ),
            (
                Espv2TlsFlags {
                    ssl_server_cert_path: s("/c"),
                    ssl_maximum_protocol: s("TLSv1.1"),
                    ..Default::default()
                },
                "--ssl_maximum_protocol=TLSv1.1 cannot be honoured",
            ),
            (
                Espv2TlsFlags {
                    ssl_backend_client_cipher_suites: s("AES128-SHA"),
                    ..Default::default()
                },
                "invalid --ssl_backend_client_cipher_suites entry \"AES128-SHA\"",
            ),
        ] {
            let e = from_espv2_flags(&flags).unwrap_err().0;
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }

    #[test]
    fn self_signed_identity_builds() {
        let cfg = server_config(&ServerTls {
            identity: ServerIdentity::SelfSigned,
            ..ServerTls::default()
        })
        .unwrap();
        assert_eq!(cfg.alpn_protocols.len(), 2);
    }
}
