//! Trace context headers in and out: `X-Cloud-Trace-Context`, `traceparent` and
//! `grpc-trace-bin`, each parsed with the rules of the proxy Portico imitates (ESP v1's own
//! parser, or the opencensus-cpp one inside ESPv2's Envoy). The differences are deliberate;
//! the table is in docs/tracing.md ("Context headers") and in the tests at the bottom.
//!
//! Parsing never allocates: a request that is not traced pays for a few comparisons only.

use crate::dialect::Dialect;
use base64::Engine;
use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub static X_CLOUD_TRACE_CONTEXT: HeaderName = HeaderName::from_static("x-cloud-trace-context");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static GRPC_TRACE_BIN: HeaderName = HeaderName::from_static("grpc-trace-bin");

/// The three context headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    CloudTrace,
    TraceParent,
    GrpcTraceBin,
}

impl Format {
    pub fn header(self) -> &'static HeaderName {
        match self {
            Format::CloudTrace => &X_CLOUD_TRACE_CONTEXT,
            Format::TraceParent => &TRACEPARENT,
            Format::GrpcTraceBin => &GRPC_TRACE_BIN,
        }
    }

    /// ESPv2's `--tracing_incoming_context` / `--tracing_outgoing_context` names.
    pub fn from_flag(s: &str) -> Option<Format> {
        match s {
            "x-cloud-trace-context" => Some(Format::CloudTrace),
            "traceparent" => Some(Format::TraceParent),
            "grpc-trace-bin" => Some(Format::GrpcTraceBin),
            _ => None,
        }
    }
}

/// A context read from the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent<'a> {
    pub trace_id: [u8; 16],
    /// 0: none (ESP accepts `TRACE;o=1` and span 0; the root then has no parent).
    pub span_id: u64,
    /// The header asks for a trace (ESP: bit 0 of `o=`; ESPv2: the sampled flag).
    pub sampled: bool,
    pub format: Format,
    /// ESP's `X-Cloud-Trace-Context` options text after the first `;`, sent back as is.
    pub options: Option<&'a str>,
    /// ESP's `X-Cloud-Trace-Context` trace ID as sent, case kept: ESP forwards and exports the
    /// text it was given (opencensus, in ESPv2, keeps bytes and writes lower case).
    pub trace_text: Option<&'a str>,
}

/// Longest header value looked at: every valid one is far shorter (`grpc-trace-bin` with a few
/// extra fields included), and a longer one is not parsed at all.
const MAX_VALUE: usize = 128;

/// The incoming context ESP v1 reads: `grpc-trace-bin` when present (and then only it), else
/// `X-Cloud-Trace-Context`. `traceparent` is not read by ESP v1.
pub fn incoming_esp(headers: &HeaderMap) -> Option<Parent<'_>> {
    if let Some(v) = headers.get(&GRPC_TRACE_BIN) {
        return parse_grpc_trace_bin(v.as_bytes(), Dialect::Esp);
    }
    headers
        .get(&X_CLOUD_TRACE_CONTEXT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_cloud_trace_esp)
}

/// The incoming context ESPv2 reads: the first of `formats` present in the request decides
/// (an invalid value there means no parent; later formats are not tried).
pub fn incoming_espv2<'a>(headers: &'a HeaderMap, formats: &[Format]) -> Option<Parent<'a>> {
    let (format, value) = formats
        .iter()
        .find_map(|f| headers.get(f.header()).map(|v| (*f, v)))?;
    match format {
        Format::CloudTrace => value.to_str().ok().and_then(parse_cloud_trace_espv2),
        Format::TraceParent => value.to_str().ok().and_then(parse_traceparent),
        Format::GrpcTraceBin => parse_grpc_trace_bin(value.as_bytes(), Dialect::EspV2),
    }
}

fn hex_trace_id(s: &str, lowercase_only: bool) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0], lowercase_only)? << 4) | hex_digit(pair[1], lowercase_only)?;
    }
    Some(out)
}

fn hex_digit(c: u8, lowercase_only: bool) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !lowercase_only => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A decimal u64 of digits only (no sign, no spaces, no overflow).
fn decimal_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// ESP v1: `TRACE_ID[/SPAN_ID][;o=N]`; `N` from 0 to 3, any `;` item; no `o=`: not sampled.
pub fn parse_cloud_trace_esp(v: &str) -> Option<Parent<'_>> {
    if v.len() > MAX_VALUE {
        return None;
    }
    let (ids, options) = match v.split_once(';') {
        Some((i, o)) => (i, Some(o)),
        None => (v, None),
    };
    let (trace, span) = match ids.split_once('/') {
        Some((t, s)) => (t, decimal_u64(s)?),
        None => (ids, 0),
    };
    let trace_id = hex_trace_id(trace, false)?;
    // The first `o=` item decides; the others are not looked at.
    let sampled = match options.and_then(|o| o.split(';').find_map(|i| i.strip_prefix("o="))) {
        Some(n) => esp_option_value(n)? & 1 == 1,
        None => false,
    };
    Some(Parent {
        trace_id,
        span_id: span,
        sampled,
        format: Format::CloudTrace,
        options,
        trace_text: Some(trace),
    })
}

/// ESP reads the `o=` value with a C++ stream into an int: leading white space and a sign are
/// accepted, then digits to the end; 0 to 3 only.
fn esp_option_value(n: &str) -> Option<u8> {
    let n = n.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, digits) = match n.as_bytes().first() {
        Some(b'-') => (true, &n[1..]),
        Some(b'+') => (false, &n[1..]),
        _ => (false, n),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let v: i64 = digits.parse().ok()?;
    let v = if negative { -v } else { v };
    u8::try_from(v).ok().filter(|v| *v <= 3)
}

/// ESPv2 (opencensus-cpp): `TRACE_ID/SPAN_ID;o=N`, the span required and non-zero, the
/// options exactly the last four characters, `N` from 0 to 3 (1 or 3: sampled).
pub fn parse_cloud_trace_espv2(v: &str) -> Option<Parent<'_>> {
    if v.len() > MAX_VALUE || v.len() < 4 {
        return None;
    }
    let (ids, opt) = v.split_at(v.len() - 4);
    let n = match opt.as_bytes() {
        [b';', b'o', b'=', n @ b'0'..=b'3'] => n - b'0',
        _ => return None,
    };
    let (trace, span) = ids.split_once('/')?;
    let trace_id = hex_trace_id(trace, false).filter(|t| *t != [0; 16])?;
    let span_id = decimal_u64(span).filter(|s| *s != 0)?;
    Some(Parent {
        trace_id,
        span_id,
        sampled: n & 1 == 1,
        format: Format::CloudTrace,
        options: None,
        trace_text: None,
    })
}

/// W3C `traceparent` as opencensus-cpp reads it: exactly 55 characters, version `00`,
/// lowercase hex, non-zero IDs.
pub fn parse_traceparent(v: &str) -> Option<Parent<'_>> {
    let b = v.as_bytes();
    if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = hex_trace_id(&v[3..35], true).filter(|t| *t != [0; 16])?;
    let mut span_id = 0u64;
    for &c in &b[36..52] {
        span_id = (span_id << 4) | u64::from(hex_digit(c, true)?);
    }
    if span_id == 0 {
        return None;
    }
    let flags = (hex_digit(b[53], true)? << 4) | hex_digit(b[54], true)?;
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        format: Format::TraceParent,
        options: None,
        trace_text: None,
    })
}

/// `grpc-trace-bin`: base64 (padded or not) of version 0, then field 0 with the 16-byte trace
/// ID, field 1 with the 8-byte span ID and field 2 with the options. ESP wants exactly 29 bytes
/// and the sampled bit (an unsampled one is no header to it); ESPv2 accepts longer values and
/// either bit.
pub fn parse_grpc_trace_bin(v: &[u8], dialect: Dialect) -> Option<Parent<'static>> {
    if v.len() > MAX_VALUE {
        return None;
    }
    let v = v
        .strip_suffix(b"==")
        .or_else(|| v.strip_suffix(b"="))
        .unwrap_or(v);
    let mut buf = [0u8; MAX_VALUE];
    let n = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode_slice(v, &mut buf)
        .ok()?;
    let b = &buf[..n];
    let exact = dialect == Dialect::Esp;
    if b.len() < 29 || (exact && b.len() != 29) {
        return None;
    }
    if b[0] != 0 || b[1] != 0 || b[18] != 1 || b[27] != 2 {
        return None;
    }
    let mut trace_id = [0u8; 16];
    trace_id.copy_from_slice(&b[2..18]);
    if trace_id == [0; 16] {
        return None;
    }
    let mut span = [0u8; 8];
    span.copy_from_slice(&b[19..27]);
    let sampled = b[28] & 1 == 1;
    if exact && !sampled {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id: u64::from_be_bytes(span),
        sampled,
        format: Format::GrpcTraceBin,
        options: None,
        trace_text: None,
    })
}

/// The 29 bytes of a `grpc-trace-bin` value.
fn grpc_trace_bin_bytes(trace_id: &[u8; 16], span_id: u64, sampled: bool) -> [u8; 29] {
    let mut b = [0u8; 29];
    b[2..18].copy_from_slice(trace_id);
    b[18] = 1;
    b[19..27].copy_from_slice(&span_id.to_be_bytes());
    b[27] = 2;
    b[28] = u8::from(sampled);
    b
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_to(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `projects/{project}/traces/{hex trace_id}` (ESPv2's report `trace`) to `out`.
pub fn push_trace_name(out: &mut String, project: &str, trace_id: &[u8; 16]) {
    let mut trace_hex = [0u8; 32];
    hex_to(trace_id, &mut trace_hex);
    out.reserve("projects/".len() + project.len() + "/traces/".len() + trace_hex.len());
    out.push_str("projects/");
    out.push_str(project);
    out.push_str("/traces/");
    out.extend(trace_hex.iter().map(|&c| char::from(c)));
}

/// What an outgoing context header carries: the trace, the parent span (the Backend / egress
/// span, or ESPv2's `:check` call span) and whether the trace is sampled.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub trace_id: &'a [u8; 16],
    /// ESP: the client's trace ID text (case kept) for `X-Cloud-Trace-Context`.
    pub trace_text: Option<&'a str>,
    pub span_id: u64,
    /// ESPv2 writes untraced requests' context too, with the flag off; ESP writes only
    /// traced requests'.
    pub sampled: bool,
    /// ESP's incoming `X-Cloud-Trace-Context` options text.
    pub esp_options: Option<&'a str>,
}

/// Writes the outgoing context `formats` with `out` as their content into `headers`,
/// replacing any client copy. ESPv2 does this on every request, sampled or not, so it is
/// built for that: the values are written into one buffer and handed to the headers as shared
/// slices of it (two allocations for all of them, however many: the buffer and its shared
/// count), which the retry replay's copy of the request headers then clones by
/// reference count, not by allocation.
pub fn write_outgoing(
    formats: &[Format],
    dialect: Dialect,
    out: &Outgoing<'_>,
    headers: &mut HeaderMap,
) {
    let extra = out.esp_options.map_or(0, str::len);
    let mut buf = BytesMut::with_capacity(formats.len() * (VALUE_ROOM + extra));
    for f in formats {
        write_value(*f, dialect, out, &mut buf);
        // Every byte written is visible ASCII (hex, digits, base64, the parsed options), so
        // this never fails; a value that did would be left out, not sent broken.
        if let Ok(v) = HeaderValue::from_maybe_shared(buf.split().freeze()) {
            headers.insert(f.header(), v);
        }
    }
}

/// Room for one value but ESP's kept options: `TRACE/<20 digits>;o=1` is 57 bytes.
const VALUE_ROOM: usize = 64;

/// One outgoing header value (tests; the proxy writes them with [`write_outgoing`]).
///
/// * ESP: `TRACE/<span, decimal>;<incoming options>` (`o=1` when ESP started the trace), or
///   padded base64 for `grpc-trace-bin` with the sampled bit only for options `o=1`.
/// * ESPv2: `TRACE/<span>;o=1` (`o=0`), `00-TRACE-SPAN-01` (`-00`), or unpadded base64, the
///   flag from `sampled`.
pub fn outgoing_value(format: Format, dialect: Dialect, out: &Outgoing<'_>) -> Option<HeaderValue> {
    let mut buf = BytesMut::new();
    write_value(format, dialect, out, &mut buf);
    HeaderValue::from_maybe_shared(buf.freeze()).ok()
}

/// Appends one value (see [`outgoing_value`]) to `buf`.
fn write_value(format: Format, dialect: Dialect, out: &Outgoing<'_>, buf: &mut BytesMut) {
    let mut trace_hex = [0u8; 32];
    match (
        dialect,
        out.trace_text.map(|t| <&[u8; 32]>::try_from(t.as_bytes())),
    ) {
        // ESP forwards the client's text (32 hex digits, case kept).
        (Dialect::Esp, Some(Ok(text))) => trace_hex = *text,
        _ => hex_to(out.trace_id, &mut trace_hex),
    }
    let span_id = out.span_id;
    match format {
        Format::CloudTrace => {
            let options = match dialect {
                Dialect::Esp => out.esp_options.unwrap_or("o=1"),
                Dialect::EspV2 if out.sampled => "o=1",
                Dialect::EspV2 => "o=0",
            };
            buf.extend_from_slice(&trace_hex);
            buf.extend_from_slice(b"/");
            buf.extend_from_slice(itoa::Buffer::new().format(span_id).as_bytes());
            buf.extend_from_slice(b";");
            buf.extend_from_slice(options.as_bytes());
        }
        Format::TraceParent => {
            let mut v = *b"00-################################-################-00";
            v[3..35].copy_from_slice(&trace_hex);
            hex_to(&span_id.to_be_bytes(), &mut v[36..52]);
            if out.sampled {
                v[54] = b'1';
            }
            buf.extend_from_slice(&v);
        }
        Format::GrpcTraceBin => {
            let sampled = match dialect {
                Dialect::Esp => out.esp_options.is_none_or(|o| o == "o=1"),
                Dialect::EspV2 => out.sampled,
            };
            let b = grpc_trace_bin_bytes(out.trace_id, span_id, sampled);
            let engine = match dialect {
                Dialect::Esp => &base64::engine::general_purpose::STANDARD,
                Dialect::EspV2 => &base64::engine::general_purpose::STANDARD_NO_PAD,
            };
            // 29 bytes are 40 base64 characters padded, 39 not.
            let mut text = [0u8; 40];
            if let Ok(n) = engine.encode_slice(b, &mut text) {
                buf.extend_from_slice(text.get(..n).unwrap_or_default());
            }
        }
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The two lower-case hex digits of every byte value: one lookup per byte. ESPv2 writes a trace
/// ID in hex on every request, sampled or not (its headers and its report), so this is on the
/// request path.
static HEX_PAIRS: [[u8; 2]; 256] = {
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX_DIGITS[i >> 4], HEX_DIGITS[i & 15]];
        i += 1;
    }
    t
};

/// Writes the hex of `bytes` into `out` (two digits per byte, as far as `out` reaches).
fn hex_to(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef0123456789ABCDEF";
    fn tid() -> [u8; 16] {
        hex_trace_id(T, false).unwrap_or_default()
    }

    #[test]
    fn cloud_trace_context_dialects_differ() {
        // (input, ESP: Some((span, sampled)), ESPv2: Some((span, sampled)))
        type Row = (&'static str, Option<(u64, bool)>, Option<(u64, bool)>);
        let rows: &[Row] = &[
            ("T/123;o=1", Some((123, true)), Some((123, true))),
            ("T/123;o=3", Some((123, true)), Some((123, true))),
            ("T/123;o=0", Some((123, false)), Some((123, false))),
            ("T/123;o=2", Some((123, false)), Some((123, false))),
            // No span: ESP accepts (no parent), ESPv2 does not.
            ("T;o=1", Some((0, true)), None),
            // Span 0: the same.
            ("T/0;o=1", Some((0, true)), None),
            // No options: ESP parses but does not trace; ESPv2 refuses.
            ("T/123", Some((123, false)), None),
            // Options not last / extra items: ESP reads any item; ESPv2 wants `;o=N` last.
            ("T/123;o=1;x=y", Some((123, true)), None),
            ("T/123;x=y;o=1", Some((123, true)), None),
            ("T/123;o=4", None, None),
            ("T/123;o=", None, None),
            ("T/-1;o=1", None, None),
            ("T/+1;o=1", None, None),
            ("T/18446744073709551616;o=1", None, None),
            ("T/ 1;o=1", None, None),
            ("0123/1;o=1", None, None),
            ("", None, None),
        ];
        for (input, esp, v2) in rows {
            let v = input.replace('T', T);
            let got = parse_cloud_trace_esp(&v).map(|p| (p.span_id, p.sampled));
            assert_eq!(got, *esp, "ESP {input}");
            if let Some(p) = parse_cloud_trace_esp(&v) {
                assert_eq!(p.trace_id, tid());
            }
            let got = parse_cloud_trace_espv2(&v).map(|p| (p.span_id, p.sampled));
            assert_eq!(got, *v2, "ESPv2 {input}");
        }
        // The first `o=` decides, read as ESP's C++ stream reads an int.
        for (opts, sampled) in [
            ("o=1;o=0", Some(true)),
            ("o=0;o=1", Some(false)),
            ("o=1;o=x", Some(true)),
            ("x=1;o= 1", Some(true)),
            ("o=+1", Some(true)),
            ("o=01", Some(true)),
            ("o=-0", Some(false)),
            ("o=-1", None),
            ("o=1 ", None),
            ("o=x;o=1", None),
        ] {
            let v = format!("{T}/1;{opts}");
            assert_eq!(
                parse_cloud_trace_esp(&v).map(|p| p.sampled),
                sampled,
                "{opts}"
            );
        }
        // ESP keeps the trace ID as sent; ESPv2 keeps only its bytes.
        let v = format!("{T}/1;o=1");
        assert_eq!(
            parse_cloud_trace_esp(&v).and_then(|p| p.trace_text),
            Some(T)
        );
        assert_eq!(parse_cloud_trace_espv2(&v).and_then(|p| p.trace_text), None);
        // Huge values are not parsed.
        let long = format!("{T}/1;o=1;{}", "x".repeat(4096));
        assert!(parse_cloud_trace_esp(&long).is_none());
        // ESP keeps the options text to send back.
        let v = format!("{T}/5;o=1;foo");
        assert_eq!(
            parse_cloud_trace_esp(&v).and_then(|p| p.options),
            Some("o=1;foo")
        );
    }

    #[test]
    fn traceparent_rules() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let p = parse_traceparent(good).expect("valid");
        assert_eq!(p.span_id, 0xb7ad6b7169203331);
        assert!(p.sampled);
        assert_eq!(hex(&p.trace_id), "0af7651916cd43dd8448eb211c80319c");
        for bad in [
            // Uppercase hex.
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            // Other versions, zero IDs, lengths.
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert!(!parse_traceparent(unsampled).expect("valid").sampled);
    }

    #[test]
    fn grpc_trace_bin_dialects_differ() {
        let b = grpc_trace_bin_bytes(&tid(), 42, true);
        let padded = base64::engine::general_purpose::STANDARD.encode(b);
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(b);
        for d in [Dialect::Esp, Dialect::EspV2] {
            for v in [&padded, &unpadded] {
                let p = parse_grpc_trace_bin(v.as_bytes(), d).expect("valid");
                assert_eq!((p.trace_id, p.span_id, p.sampled), (tid(), 42, true));
            }
        }
        // Longer than 29 bytes: ESPv2 only.
        let mut long = b.to_vec();
        long.extend_from_slice(&[3, 0]);
        let long = base64::engine::general_purpose::STANDARD.encode(&long);
        assert!(parse_grpc_trace_bin(long.as_bytes(), Dialect::Esp).is_none());
        assert!(parse_grpc_trace_bin(long.as_bytes(), Dialect::EspV2).is_some());
        // Not sampled: no header to ESP; a parent that may be sampled to ESPv2.
        let off = base64::engine::general_purpose::STANDARD.encode(grpc_trace_bin_bytes(
            &tid(),
            42,
            false,
        ));
        assert!(parse_grpc_trace_bin(off.as_bytes(), Dialect::Esp).is_none());
        assert!(
            !parse_grpc_trace_bin(off.as_bytes(), Dialect::EspV2)
                .expect("valid")
                .sampled
        );
        // Zero trace, wrong field ids, short, not base64.
        let zero = base64::engine::general_purpose::STANDARD
            .encode(grpc_trace_bin_bytes(&[0; 16], 42, true));
        let mut wrong = b;
        wrong[18] = 7;
        let wrong = base64::engine::general_purpose::STANDARD.encode(wrong);
        let short = base64::engine::general_purpose::STANDARD.encode(&b[..28]);
        for bad in [zero.as_str(), wrong.as_str(), short.as_str(), "!!!!", ""] {
            for d in [Dialect::Esp, Dialect::EspV2] {
                assert!(parse_grpc_trace_bin(bad.as_bytes(), d).is_none(), "{bad}");
            }
        }
        assert!(parse_grpc_trace_bin(&[b'A'; 4096], Dialect::EspV2).is_none());
    }

    #[test]
    fn header_choice() {
        let xctc = format!("{T}/7;o=1");
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let gtb =
            base64::engine::general_purpose::STANDARD.encode(grpc_trace_bin_bytes(&tid(), 9, true));
        let mut h = HeaderMap::new();
        h.insert(
            &X_CLOUD_TRACE_CONTEXT,
            HeaderValue::from_str(&xctc).unwrap_or(HeaderValue::from_static("")),
        );
        h.insert(&TRACEPARENT, HeaderValue::from_static(tp));
        // ESP ignores traceparent.
        assert_eq!(incoming_esp(&h).map(|p| p.span_id), Some(7));
        // ESPv2's default order: traceparent first.
        let def = [Format::TraceParent, Format::CloudTrace];
        assert_eq!(
            incoming_espv2(&h, &def).map(|p| p.format),
            Some(Format::TraceParent)
        );
        let xfirst = [Format::CloudTrace, Format::TraceParent];
        assert_eq!(incoming_espv2(&h, &xfirst).map(|p| p.span_id), Some(7));
        assert!(incoming_espv2(&h, &[]).is_none());
        // ESP: grpc-trace-bin present wins, even over a valid X-Cloud-Trace-Context.
        h.insert(
            &GRPC_TRACE_BIN,
            HeaderValue::from_str(&gtb).unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(incoming_esp(&h).map(|p| p.span_id), Some(9));
        h.insert(&GRPC_TRACE_BIN, HeaderValue::from_static("garbage"));
        assert!(incoming_esp(&h).is_none());
        // ESPv2: the first present decides; an invalid one is no parent.
        h.insert(&TRACEPARENT, HeaderValue::from_static("00-bad"));
        assert!(incoming_espv2(&h, &def).is_none());
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte_for_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let want: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), want);
        assert_eq!(hex(&[]), "");
        let mut name = String::from("kept ");
        push_trace_name(&mut name, "p-1", &[0x0f; 16]);
        assert_eq!(
            name,
            format!("kept projects/p-1/traces/{}", "0f".repeat(16))
        );
    }

    #[test]
    fn write_outgoing_replaces_client_copies_with_the_values_outgoing_value_gives() {
        let t = [0x5au8; 16];
        for (dialect, formats, options, text) in [
            (
                Dialect::EspV2,
                &[
                    Format::TraceParent,
                    Format::CloudTrace,
                    Format::GrpcTraceBin,
                ][..],
                None,
                None,
            ),
            (Dialect::EspV2, &[Format::CloudTrace][..], None, None),
            (Dialect::EspV2, &[][..], None, None),
            // ESP with the client's options (at the parser's bound) and its upper-case text.
            (
                Dialect::Esp,
                &[Format::CloudTrace, Format::GrpcTraceBin][..],
                Some("o=1;x=".to_string() + &"y".repeat(MAX_VALUE - 6)),
                Some("5A".repeat(16)),
            ),
            // Text that is not 32 digits is never forwarded: the ID's hex is.
            (
                Dialect::Esp,
                &[Format::CloudTrace][..],
                None,
                Some("5A".to_string()),
            ),
        ] {
            for sampled in [false, true] {
                let out = Outgoing {
                    trace_id: &t,
                    trace_text: text.as_deref(),
                    span_id: 0x1234_5678_9abc_def0,
                    sampled,
                    esp_options: options.as_deref(),
                };
                let mut h = HeaderMap::new();
                for f in [
                    Format::TraceParent,
                    Format::CloudTrace,
                    Format::GrpcTraceBin,
                ] {
                    h.append(f.header(), HeaderValue::from_static("client-1"));
                    h.append(f.header(), HeaderValue::from_static("client-2"));
                }
                h.insert("other", HeaderValue::from_static("kept"));
                write_outgoing(formats, dialect, &out, &mut h);
                for f in [
                    Format::TraceParent,
                    Format::CloudTrace,
                    Format::GrpcTraceBin,
                ] {
                    let got: Vec<_> = h.get_all(f.header()).iter().collect();
                    if formats.contains(&f) {
                        let want = outgoing_value(f, dialect, &out).expect("value");
                        assert_eq!(got, [&want], "{dialect:?} {f:?}");
                    } else {
                        assert_eq!(got.len(), 2, "{f:?} not written, client's kept");
                    }
                }
                assert_eq!(h["other"], "kept");
            }
        }
        let out = Outgoing {
            trace_id: &t,
            trace_text: Some("5A"),
            span_id: 7,
            sampled: true,
            esp_options: None,
        };
        let v = outgoing_value(Format::CloudTrace, Dialect::Esp, &out).expect("value");
        assert_eq!(v, format!("{}/7;o=1", "5a".repeat(16)).as_str());
    }

    #[test]
    fn outgoing_values_at_the_span_id_extremes() {
        let t = [0xabu8; 16];
        for (span, decimal, hex16) in [
            (0u64, "0", "0000000000000000"),
            (u64::MAX, "18446744073709551615", "ffffffffffffffff"),
            (10, "10", "000000000000000a"),
        ] {
            let out = Outgoing {
                trace_id: &t,
                trace_text: None,
                span_id: span,
                sampled: false,
                esp_options: None,
            };
            let v = |f| outgoing_value(f, Dialect::EspV2, &out).expect("value");
            assert_eq!(
                v(Format::CloudTrace),
                format!("{}/{decimal};o=0", "ab".repeat(16)).as_str()
            );
            assert_eq!(
                v(Format::TraceParent),
                format!("00-{}-{hex16}-00", "ab".repeat(16)).as_str()
            );
        }
    }

    #[test]
    fn outgoing_values() {
        let t = tid();
        let vs = |f, d, o, sampled| {
            let out = Outgoing {
                trace_id: &t,
                trace_text: None,
                span_id: 0x1234,
                sampled,
                esp_options: o,
            };
            outgoing_value(f, d, &out)
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .unwrap_or_default()
        };
        let v = |f, d, o| vs(f, d, o, true);
        let up = T.to_ascii_lowercase();
        assert_eq!(
            v(Format::CloudTrace, Dialect::Esp, Some("o=1;x")),
            format!("{up}/4660;o=1;x")
        );
        assert_eq!(
            v(Format::CloudTrace, Dialect::Esp, None),
            format!("{up}/4660;o=1")
        );
        assert_eq!(
            v(Format::CloudTrace, Dialect::EspV2, Some("o=3")),
            format!("{up}/4660;o=1")
        );
        assert_eq!(
            v(Format::TraceParent, Dialect::EspV2, None),
            format!("00-{}-0000000000001234-01", T.to_ascii_lowercase())
        );
        let esp = v(Format::GrpcTraceBin, Dialect::Esp, None);
        let v2 = v(Format::GrpcTraceBin, Dialect::EspV2, None);
        assert!(esp.ends_with('='), "{esp}");
        assert!(!v2.ends_with('='), "{v2}");
        for s in [&esp, &v2] {
            let p = parse_grpc_trace_bin(s.as_bytes(), Dialect::EspV2).expect("round trip");
            assert_eq!((p.trace_id, p.span_id, p.sampled), (t, 0x1234, true));
        }
        // ESP writes the client's trace ID text back, upper-case hex and all; ESPv2 and ESP's
        // binary header write the bytes.
        let kept = Outgoing {
            trace_id: &t,
            trace_text: Some(T),
            span_id: 0x1234,
            sampled: true,
            esp_options: Some("o=1"),
        };
        let text = |f, d| {
            outgoing_value(f, d, &kept)
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            text(Format::CloudTrace, Dialect::Esp),
            format!("{T}/4660;o=1")
        );
        assert_eq!(
            text(Format::CloudTrace, Dialect::EspV2),
            format!("{up}/4660;o=1")
        );
        // ESPv2's untraced requests: the flag off in each format.
        assert_eq!(
            vs(Format::CloudTrace, Dialect::EspV2, None, false),
            format!("{up}/4660;o=0")
        );
        assert_eq!(
            vs(Format::TraceParent, Dialect::EspV2, None, false),
            format!("00-{up}-0000000000001234-00")
        );
        let off = vs(Format::GrpcTraceBin, Dialect::EspV2, None, false);
        let p = parse_grpc_trace_bin(off.as_bytes(), Dialect::EspV2).expect("round trip");
        assert_eq!((p.trace_id, p.span_id, p.sampled), (t, 0x1234, false));
        // The longest ESP options text still fits.
        let long = format!("o=1;{}", "x".repeat(MAX_VALUE - 37));
        assert!(vs(Format::CloudTrace, Dialect::Esp, Some(&long), true).ends_with(&long));
        // ESP: the sampled bit only for options exactly `o=1`.
        let off = v(Format::GrpcTraceBin, Dialect::Esp, Some("o=3"));
        assert!(
            !parse_grpc_trace_bin(off.as_bytes(), Dialect::EspV2)
                .expect("valid")
                .sampled
        );
    }
}
