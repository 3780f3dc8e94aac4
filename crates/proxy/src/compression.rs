//! Response compression, ESPv2's `--enable_response_compression`: gzip and brotli, negotiated
//! and applied as Envoy's compressor filter does with its default settings (ESPv2 installs one
//! gzip and one brotli filter, gzip first, each with an empty configuration).
//!
//! **Negotiation** ([`negotiate`], once per request from `Accept-Encoding`, every copy of the
//! header read as one list): the coding with the highest weight among `gzip`, `br`, `identity`
//! and `*` wins, the first listed on a tie (`gzip, br` is gzip, `br, gzip` is brotli); `*` means
//! gzip (the first filter), or brotli when gzip is refused; `identity` or nothing acceptable
//! means no compression. `q=0` refuses a coding, also for `*` (`gzip;q=0, *` is brotli). Codings
//! compare in any case. A token whose weight is not an RFC 9110 qvalue (`q=NaN`, `q=2`,
//! `q=-1`, `q=0.0001`) is skipped, as Envoy skips weights it cannot parse; unknown codings and
//! parameters are ignored. The header is read in one pass per step without allocating, so its
//! size costs no more than reading it (the head limits bound it).
//!
//! **What is compressed** ([`compressible`], on the response head): not a 1xx; a length (the
//! `Content-Length`, or the proxy's own body's) of at least [`CompressionSettings::min_length`]
//! (30) bytes, or no length at all (a streamed response); a `Content-Type` in
//! [`DEFAULT_CONTENT_TYPES`] (parameters ignored, any case) or none; no `Cache-Control:
//! no-transform`; no `Content-Encoding` (already encoded, even `identity`). Portico also leaves
//! `206 Partial Content` and anything with `Content-Range` alone: the range is of the
//! uncompressed bytes. Such a response always gets `Vary: Accept-Encoding`, compressed or not,
//! so a cache in front does not hand a compressed copy to a client that cannot read it. It is
//! compressed when the client accepted a coding and the response has a body (not HEAD, 204 or
//! 304): `Content-Encoding` set, `Content-Length` removed (HTTP/1.1 then chunks), a strong
//! `ETag` removed (weak ones kept), as Envoy does. The proxy's own JSON errors are compressed
//! like any other response, as ESPv2's are (its compressor runs before its JWT and Service
//! Control filters).
//!
//! **Streaming** ([`Encoder`]): every body frame is compressed and flushed (gzip's sync flush,
//! brotli's flush) as it arrives, never buffered whole: a server-sent stream reaches the client
//! as it is produced, and a response that never ends costs one encoder's fixed state, not a
//! growing buffer. The output of a frame is bounded by the frame (plus a few bytes).
//!
//! **Memory**: an encoder holds its window and hash tables (gzip: about 350 KiB with flate2's
//! Rust backend; brotli at quality 3 with a 2^18-byte window, Envoy's defaults: about 1.2 MiB
//! once it has seen a few hundred KiB)
//! for as long as its response streams. At most [`CompressionSettings::max_streams`] encoders
//! exist at once across the proxy ([`Gate`]); a response past the cap is sent uncompressed
//! (still with `Vary`), which every client accepts. Envoy has no such cap.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Envoy's compressor default: smaller responses (by `Content-Length`) are sent as they are.
pub const DEFAULT_MIN_LENGTH: u64 = 30;

/// The content types Envoy's compressor compresses when none are configured (ESPv2 configures
/// none).
pub const DEFAULT_CONTENT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "application/javascript",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
    "application/json",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
];

/// Encoders alive at once, across the proxy, by default: at about 1.2 MiB for a brotli one,
/// 150 MiB at most.
pub const DEFAULT_MAX_STREAMS: usize = 128;

/// `--enable_response_compression`'s settings (Envoy's defaults, plus the encoder cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionSettings {
    pub min_length: u64,
    /// Lower-case media types, without parameters.
    pub content_types: Vec<String>,
    /// Encoders alive at once; past it, responses go uncompressed.
    pub max_streams: usize,
    /// zlib level (Envoy's default compression level is zlib's default, 6).
    pub gzip_level: u32,
    /// Envoy's brotli defaults: quality 3, window 2^18.
    pub brotli_quality: u32,
    pub brotli_window_bits: u32,
}

impl Default for CompressionSettings {
    fn default() -> Self {
        CompressionSettings {
            min_length: DEFAULT_MIN_LENGTH,
            content_types: DEFAULT_CONTENT_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_streams: DEFAULT_MAX_STREAMS,
            gzip_level: 6,
            brotli_quality: 3,
            brotli_window_bits: 18,
        }
    }
}

/// A content coding the proxy produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Brotli,
}

impl Encoding {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
        }
    }
}

/// RFC 9110's qvalue, in thousandths: `0`, `0.5`, `1`, `1.000`; anything else is `None`.
fn qvalue(b: &[u8]) -> Option<u16> {
    let (int, frac) = match b.iter().position(|&c| c == b'.') {
        Some(p) => (&b[..p], Some(&b[p + 1..])),
        None => (b, None),
    };
    let whole = match int {
        b"0" => 0u16,
        b"1" => 1,
        _ => return None,
    };
    let Some(frac) = frac else {
        return Some(whole * 1000);
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    if whole == 1 && thousandths != 0 {
        return None;
    }
    Some(whole * 1000 + thousandths)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t'))
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t'))
        .map_or(start, |p| p + 1);
    &b[start..end]
}

/// Each `coding;params` token of every value, with its weight (1000 without `q`); tokens whose
/// `q` is not a qvalue are skipped.
fn tokens<'a>(
    values: impl Iterator<Item = &'a HeaderValue> + 'a,
) -> impl Iterator<Item = (&'a [u8], u16)> + 'a {
    values
        .flat_map(|v| v.as_bytes().split(|&c| c == b','))
        .filter_map(|token| {
            let mut parts = token.split(|&c| c == b';');
            let coding = trim(parts.next().unwrap_or_default());
            if coding.is_empty() {
                return None;
            }
            let mut q = 1000;
            for p in parts {
                let p = trim(p);
                let (name, value) = match p.iter().position(|&c| c == b'=') {
                    Some(i) => (trim(&p[..i]), trim(&p[i + 1..])),
                    None => (p, &p[p.len()..]),
                };
                if name.eq_ignore_ascii_case(b"q") {
                    q = qvalue(value)?;
                    break;
                }
            }
            Some((coding, q))
        })
}

/// The coding the client prefers among those the proxy produces, from every `Accept-Encoding`
/// of the request (see the module docs); `None`: send the response as it is.
pub fn negotiate(request: &HeaderMap) -> Option<Encoding> {
    let values = || request.get_all(header::ACCEPT_ENCODING).iter();
    let is = |c: &[u8], name: &[u8]| c.eq_ignore_ascii_case(name);
    // First pass: which codings the client refuses (q=0), wherever it says so.
    let (mut gzip_ok, mut br_ok, mut any) = (true, true, false);
    for (coding, q) in tokens(values()) {
        any = true;
        if q == 0 {
            if is(coding, b"gzip") {
                gzip_ok = false;
            } else if is(coding, b"br") {
                br_ok = false;
            }
        }
    }
    if !any || !(gzip_ok || br_ok) {
        return None;
    }
    // Second pass: the highest weight wins, the first listed on a tie.
    #[derive(Clone, Copy)]
    enum Pick {
        Nothing,
        Identity,
        Wildcard,
        Coding(Encoding),
    }
    let mut best = (Pick::Nothing, 0u16);
    for (coding, q) in tokens(values()) {
        if q <= best.1 {
            continue;
        }
        let pick = if is(coding, b"gzip") && gzip_ok {
            Pick::Coding(Encoding::Gzip)
        } else if is(coding, b"br") && br_ok {
            Pick::Coding(Encoding::Brotli)
        } else if is(coding, b"identity") {
            Pick::Identity
        } else if coding == b"*" {
            Pick::Wildcard
        } else {
            continue;
        };
        best = (pick, q);
    }
    match best.0 {
        Pick::Coding(e) => Some(e),
        Pick::Wildcard if gzip_ok => Some(Encoding::Gzip),
        Pick::Wildcard => Some(Encoding::Brotli),
        Pick::Nothing | Pick::Identity => None,
    }
}

fn has_token(headers: &HeaderMap, name: &header::HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&c| c == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(token))
    })
}

/// Whether a response may be compressed at all (see the module docs); `body_len` is the
/// length of the proxy's own body when it knows it and the head names none.
pub fn compressible(
    settings: &CompressionSettings,
    status: StatusCode,
    headers: &HeaderMap,
    body_len: Option<u64>,
) -> bool {
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT {
        return false;
    }
    let length = match headers.get(header::CONTENT_LENGTH) {
        // Unreadable: not compressed, as Envoy.
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => return false,
        },
        None => body_len,
    };
    if length.is_some_and(|n| n < settings.min_length) {
        return false;
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let media = trim(
            ct.as_bytes()
                .split(|&c| c == b';')
                .next()
                .unwrap_or_default(),
        );
        if !settings
            .content_types
            .iter()
            .any(|t| t.as_bytes().eq_ignore_ascii_case(media))
        {
            return false;
        }
    }
    !has_token(headers, &header::CACHE_CONTROL, b"no-transform")
        && !headers.contains_key(header::CONTENT_ENCODING)
        && !headers.contains_key(header::CONTENT_RANGE)
}

/// Adds `Accept-Encoding` to `Vary` unless it is there (or `Vary: *`).
pub fn add_vary(headers: &mut HeaderMap) {
    if has_token(headers, &header::VARY, b"accept-encoding")
        || has_token(headers, &header::VARY, b"*")
    {
        return;
    }
    headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
}

/// The head of a response about to be compressed with `enc`.
pub fn set_encoded_head(headers: &mut HeaderMap, enc: Encoding) {
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(enc.token()),
    );
    // The compressed bytes are another representation: a strong validator no longer holds.
    let strong = headers
        .get(header::ETAG)
        .is_some_and(|v| !(v.as_bytes().starts_with(b"W/") || v.as_bytes().starts_with(b"w/")));
    if strong {
        headers.remove(header::ETAG);
    }
}

/// The cap on encoders alive at once ([`CompressionSettings::max_streams`]), shared by every
/// serving thread; `active` mirrors the count on `/metrics`.
#[derive(Debug)]
pub struct Gate {
    active: AtomicUsize,
    max: usize,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// One encoder's place under the [`Gate`]; given back when dropped.
#[derive(Debug)]
pub struct Permit(Arc<Gate>);

impl Gate {
    pub fn new(max: usize, gauge: prometheus_client::metrics::gauge::Gauge) -> Arc<Gate> {
        Arc::new(Gate {
            active: AtomicUsize::new(0),
            max,
            gauge,
        })
    }

    /// A place for one more encoder, or `None` at the cap.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut n = self.active.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
                return None;
            }
            match self
                .active
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.gauge.inc();
                    return Some(Permit(self.clone()));
                }
                Err(now) => n = now,
            }
        }
    }

    /// Encoders alive now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

enum Kind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    // Boxed: brotli's writer state is large and this enum sits in every compressed body.
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

/// A response body's encoder: each frame in, its compressed bytes out, flushed.
pub struct Encoder {
    kind: Option<Kind>,
    _permit: Permit,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

/// brotli's internal output buffer (Envoy's chunk size).
const BROTLI_BUFFER: usize = 4096;

impl Encoder {
    pub fn new(enc: Encoding, settings: &CompressionSettings, permit: Permit) -> Encoder {
        let kind = match enc {
            Encoding::Gzip => Kind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(settings.gzip_level.min(9)),
            )),
            Encoding::Brotli => Kind::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                settings.brotli_quality.min(11),
                settings.brotli_window_bits.clamp(10, 24),
            ))),
        };
        Encoder {
            kind: Some(kind),
            _permit: permit,
        }
    }

    /// Compresses one frame and flushes it: the returned bytes decode to everything given so
    /// far. Empty when the encoder is finished.
    pub fn compress(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        let out = match &mut self.kind {
            None => return Ok(Bytes::new()),
            Some(Kind::Gzip(w)) => {
                w.write_all(data)?;
                w.flush()?;
                std::mem::take(w.get_mut())
            }
            Some(Kind::Brotli(w)) => {
                w.write_all(data)?;
                w.flush()?;
                std::mem::take(w.get_mut())
            }
        };
        Ok(Bytes::from(out))
    }

    /// Ends the stream (gzip's trailer, brotli's last block).
    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        let out = match self.kind.take() {
            None => Vec::new(),
            Some(Kind::Gzip(w)) => w.finish()?,
            Some(Kind::Brotli(w)) => w.into_inner(),
        };
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pick(v: &[&str]) -> Option<Encoding> {
        let mut h = HeaderMap::new();
        for s in v {
            h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(s).unwrap());
        }
        negotiate(&h)
    }

    #[test]
    fn negotiation_follows_envoys_rules() {
        use Encoding::{Brotli, Gzip};
        let cases: &[(&[&str], Option<Encoding>)] = &[
            (&["gzip"], Some(Gzip)),
            (&["br"], Some(Brotli)),
            (&["gzip,br"], Some(Gzip)),
            (&["br, gzip"], Some(Brotli)),
            (&["gzip;q=0.1,br;q=0.9"], Some(Brotli)),
            (&["gzip;q=0.9,br;q=0.1"], Some(Gzip)),
            (&["GZIP"], Some(Gzip)),
            (&["*"], Some(Gzip)),
            (&["gzip;q=0, *"], Some(Brotli)),
            (&["*;q=0"], None),
            (&["gzip;q=0"], None),
            (&["gzip;q=0, br;q=0, *"], None),
            (&["gzip, gzip;q=0"], None),
            (&["identity"], None),
            (&["identity, gzip;q=0.5"], None),
            (&["gzip;q=0.5, identity;q=0.6"], None),
            (&["deflate, compress"], None),
            (&[""], None),
            (&[",,, ;"], None),
            // Weights that are not qvalues skip their token.
            (&["br;q=NaN"], None),
            (&["br;q=NaN, gzip;q=0.1"], Some(Gzip)),
            (&["br;q=2, gzip;q=0.1"], Some(Gzip)),
            (&["br;q=-1, gzip"], Some(Gzip)),
            (&["br;q=0.0001"], None),
            (&["br;q=1.001"], None),
            (&["br;q=1.000"], Some(Brotli)),
            (&["br;q=", "gzip"], Some(Gzip)),
            (&["gzip;level=1;q=0.2, br;q=0.1"], Some(Gzip)),
            // Two headers are one list.
            (&["deflate", "br"], Some(Brotli)),
            (&["br", "br;q=0"], None),
        ];
        for (v, want) in cases {
            assert_eq!(pick(v), *want, "{v:?}");
        }
    }

    #[test]
    fn a_huge_accept_encoding_is_read_in_linear_time() {
        let mut s = String::new();
        for _ in 0..5000 {
            s.push_str("x-unknown;q=0.5, ");
        }
        s.push_str("br;q=0.6");
        assert_eq!(pick(&[&s]), Some(Encoding::Brotli));
    }

    #[test]
    fn what_is_compressible() {
        let st = CompressionSettings::default();
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let ok = StatusCode::OK;
        assert!(compressible(
            &st,
            ok,
            &h(&[("content-type", "application/json; charset=utf-8")]),
            None
        ));
        assert!(compressible(
            &st,
            ok,
            &h(&[("content-type", "Text/HTML")]),
            Some(30)
        ));
        assert!(compressible(&st, ok, &h(&[]), None));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("content-type", "image/png")]),
            None
        ));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("content-type", "application/grpc")]),
            None
        ));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("content-type", "text/event-stream")]),
            None
        ));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("content-length", "29")]),
            None
        ));
        assert!(!compressible(&st, ok, &h(&[]), Some(29)));
        assert!(!compressible(&st, ok, &h(&[("content-length", "x")]), None));
        assert!(compressible(
            &st,
            ok,
            &h(&[("content-length", "30")]),
            Some(5)
        ));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("cache-control", "public, No-Transform")]),
            None
        ));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("content-encoding", "identity")]),
            None
        ));
        assert!(!compressible(
            &st,
            ok,
            &h(&[("content-range", "bytes 0-99/200")]),
            None
        ));
        assert!(!compressible(
            &st,
            StatusCode::PARTIAL_CONTENT,
            &h(&[]),
            None
        ));
        assert!(!compressible(
            &st,
            StatusCode::SWITCHING_PROTOCOLS,
            &h(&[]),
            None
        ));
    }

    #[test]
    fn vary_and_etag() {
        let mut m = HeaderMap::new();
        m.insert(header::VARY, HeaderValue::from_static("Origin"));
        m.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        m.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        add_vary(&mut m);
        add_vary(&mut m);
        set_encoded_head(&mut m, Encoding::Brotli);
        assert_eq!(
            m.get_all(header::VARY).iter().collect::<Vec<_>>(),
            ["Origin", "Accept-Encoding"]
        );
        assert!(m.get(header::ETAG).is_none() && m.get(header::CONTENT_LENGTH).is_none());
        assert_eq!(m[header::CONTENT_ENCODING], "br");
        let mut m = HeaderMap::new();
        m.insert(header::ETAG, HeaderValue::from_static("W/\"abc\""));
        set_encoded_head(&mut m, Encoding::Gzip);
        assert_eq!(m[header::ETAG], "W/\"abc\"");
    }

    #[test]
    fn encoders_stream_and_the_gate_caps_them() {
        let gate = Gate::new(1, Default::default());
        let st = CompressionSettings::default();
        for enc in [Encoding::Gzip, Encoding::Brotli] {
            let permit = gate.try_acquire().unwrap();
            assert!(gate.try_acquire().is_none());
            let mut e = Encoder::new(enc, &st, permit);
            let mut wire = Vec::new();
            let text = b"hello hello hello hello hello hello hello";
            wire.extend_from_slice(&e.compress(text).unwrap());
            // Flushed: what is on the wire so far already decodes to the first frame.
            let mut partial = Vec::new();
            match enc {
                Encoding::Gzip => {
                    let mut d = flate2::write::GzDecoder::new(Vec::new());
                    d.write_all(&wire).unwrap();
                    d.flush().unwrap();
                    partial = d.get_ref().clone();
                }
                Encoding::Brotli => {
                    let mut d = brotli::DecompressorWriter::new(Vec::new(), 4096);
                    d.write_all(&wire).unwrap();
                    d.flush().unwrap();
                    partial.extend_from_slice(d.get_ref());
                }
            }
            assert_eq!(partial, text);
            wire.extend_from_slice(&e.compress(b" world").unwrap());
            wire.extend_from_slice(&e.finish().unwrap());
            assert!(e.compress(b"late").unwrap().is_empty());
            let mut out = Vec::new();
            match enc {
                Encoding::Gzip => {
                    flate2::read::GzDecoder::new(&wire[..])
                        .read_to_end(&mut out)
                        .unwrap();
                }
                Encoding::Brotli => {
                    brotli::Decompressor::new(&wire[..], 4096)
                        .read_to_end(&mut out)
                        .unwrap();
                }
            }
            assert_eq!(out, b"hello hello hello hello hello hello hello world");
            drop(e);
            assert_eq!(gate.active(), 0);
        }
    }
}
