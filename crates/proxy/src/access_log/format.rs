//! ESPv2's `--access_log_format`: Envoy's access-log format strings, compiled once at start-up
//! into a [`Format`] and rendered per request from a [`Record`].
//!
//! Text is copied as written; `%%` is a literal `%`; a command operator is `%NAME%`,
//! `%NAME(arg)%` or `%NAME(arg):N%` (at most N bytes). The operators Portico renders:
//!
//! | Operator | Value |
//! |---|---|
//! | `%START_TIME%`, `%START_TIME(fmt)%` | when the request arrived; default `2006-01-02T15:04:05.000Z`; `fmt` is strftime (`%Y %m %d %H %M %S %y %j %e %a %A %b %B %p %I %Z %z %s %F %T %D %R %n %t %%`) plus Envoy's `%ES`/`%1S`…`%9S`-style fractions (`%E3S`, `%3f`, `%6f`, `%9f`, `%f`) |
//! | `%REQ(H)%`, `%REQ(H?ALT)%`, `%REQ(H):N%` | the request header's first value (`:METHOD`, `:PATH`, `:AUTHORITY`, `:SCHEME` too) |
//! | `%RESP(H)%`, `%RESP(H?ALT)%`, `%RESP(H):N%` | the response header's first value |
//! | `%RESPONSE_CODE%` | the status sent (0 when none was) |
//! | `%RESPONSE_FLAGS%` | Envoy's short flags: `UF`, `UH`, `UT`, `UC`, `UR`, `URX`, `DC`, or `-` |
//! | `%RESPONSE_CODE_DETAILS%` | ESPv2's detail (`via_upstream`, `direct_response`, `jwt_authn_access_denied{...}`, ...) |
//! | `%BYTES_RECEIVED%`, `%BYTES_SENT%` | body bytes received from the client, sent to it |
//! | `%DURATION%`, `%REQUEST_DURATION%`, `%RESPONSE_DURATION%` | milliseconds: total, until the request's last byte, until the backend's response head |
//! | `%PROTOCOL%` | `HTTP/1.0`, `HTTP/1.1`, `HTTP/2` |
//! | `%UPSTREAM_HOST%` | the backend's `host:port` the request went to |
//! | `%UPSTREAM_TRANSPORT_FAILURE_REASON%` | why the backend could not be reached |
//! | `%DOWNSTREAM_REMOTE_ADDRESS%` (`_WITHOUT_PORT`) | the client, as `X-Forwarded-For` is believed |
//! | `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%` (`_WITHOUT_PORT`), `%DOWNSTREAM_LOCAL_ADDRESS%` (`_WITHOUT_PORT`) | the TCP peer; the listener's address |
//! | `%HOSTNAME%` | the machine's name |
//! | `%FILTER_STATE(com.google.espv2.filters.http.service_control.api_method)%` | the operation, JSON-quoted as ESPv2 writes it |
//!
//! A value that is not known is `-`, as in Envoy. Anything else (an unknown or unsupported
//! operator, a `%` that starts none, an unclosed `(`, a bad `:N`, a strftime conversion not
//! listed) stops the start with a sentence naming the byte where it is.
//!
//! **Forgery.** Every rendered value has its control characters written as `\xHH` (`\n`,
//! `\r`, `\t` by name) and its `\` doubled, bytes that are not UTF-8 as U+FFFD, so a client
//! cannot end a line or start a fake one, nor pass its own `\x0a` for an escape; only the
//! format's own text holds line breaks. The operation (`%FILTER_STATE(...api_method)%`) is a
//! JSON string, escaped as JSON. A newline ends each entry (added when the
//! format does not end with one).
//!
//! **Secrets.** API keys and credentials are never written: `:PATH` and `Referer` have their
//! credential query parameters masked (as the JSON log does), and `Authorization`,
//! `Proxy-Authorization`, `Cookie`, `X-API-Key`, `X-Goog-API-Key` and the matched method's own
//! API-key headers render as `[REDACTED]`. ESPv2's `...service_control.api_key` filter state
//! (the API key itself) is refused at start-up.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Version;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// ESPv2's filter-state key for the operation name.
pub const API_METHOD_STATE: &str = "com.google.espv2.filters.http.service_control.api_method";
/// ESPv2's filter-state key for the API key: refused.
const API_KEY_STATE: &str = "com.google.espv2.filters.http.service_control.api_key";

/// Envoy operators Portico has no equivalent for: named so the refusal says "not supported".
const ENVOY_ONLY: &[&str] = &[
    "REQ_WITHOUT_QUERY",
    "REQUEST_HEADERS_BYTES",
    "RESPONSE_HEADERS_BYTES",
    "RESPONSE_TRAILERS_BYTES",
    "RESP_TRAILER",
    "TRAILER",
    "UPSTREAM_CLUSTER",
    "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_REMOTE_ADDRESS",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "UPSTREAM_WIRE_BYTES_SENT",
    "UPSTREAM_WIRE_BYTES_RECEIVED",
    "DOWNSTREAM_WIRE_BYTES_SENT",
    "DOWNSTREAM_WIRE_BYTES_RECEIVED",
    "ROUTE_NAME",
    "VIRTUAL_CLUSTER_NAME",
    "DYNAMIC_METADATA",
    "CLUSTER_METADATA",
    "UPSTREAM_METADATA",
    "CONNECTION_ID",
    "STREAM_ID",
    "CONNECTION_TERMINATION_DETAILS",
    "REQUESTED_SERVER_NAME",
    "DOWNSTREAM_TLS_VERSION",
    "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_SESSION_ID",
    "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_LOCAL_URI_SAN",
    "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_CERT",
    "ENVIRONMENT",
    "GRPC_STATUS",
    "GRPC_STATUS_NUMBER",
    "RESPONSE_TX_DURATION",
    "UPSTREAM_PROTOCOL",
];

/// Headers whose values are credentials: never written.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-goog-api-key",
    "x-goog-iap-jwt-assertion",
];

const REDACTED: &str = "[REDACTED]";

/// Why a format was refused; `at` is the byte of the format where the problem starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error(
        "the '%' at byte {at} starts no command operator; write %% for a literal '%' \
         (operators look like %PROTOCOL% or %REQ(:PATH)%)"
    )]
    LonePercent { at: usize },
    #[error("byte {at}: the '(' of %{name}(...)% is not closed")]
    UnclosedArgument { at: usize, name: String },
    #[error("byte {at}: %{name}% is not an Envoy command operator")]
    Unknown { at: usize, name: String },
    #[error("byte {at}: %{name}% is an Envoy command operator that Portico does not support")]
    Unsupported { at: usize, name: String },
    #[error("byte {at}: %{name}% takes no argument")]
    NoArgument { at: usize, name: String },
    #[error("byte {at}: %{name}(...)% needs an argument")]
    NeedsArgument { at: usize, name: String },
    #[error("byte {at}: %{name}(...)%: {arg:?} is not a header name")]
    BadHeader {
        at: usize,
        name: String,
        arg: String,
    },
    #[error("byte {at}: the length after ':' must be a whole number above 0")]
    BadMaxLength { at: usize },
    #[error("byte {at}: a maximum length (:N) only applies to %REQ%, %RESP% and %FILTER_STATE%")]
    NoMaxLength { at: usize },
    #[error("byte {at}: %START_TIME({fmt})%: {why}")]
    TimeFormat { at: usize, fmt: String, why: String },
    #[error(
        "byte {at}: %FILTER_STATE({key})%: Portico never writes API keys to its logs; log \
         %FILTER_STATE({API_METHOD_STATE})% for the operation instead"
    )]
    ApiKeyState { at: usize, key: String },
    #[error(
        "byte {at}: %FILTER_STATE({key})%: the only filter state Portico has is {API_METHOD_STATE}"
    )]
    UnknownState { at: usize, key: String },
    #[error("the format is empty")]
    Empty,
    #[error("the format is longer than {MAX_FORMAT_BYTES} bytes")]
    TooLong,
}

/// Longest format taken (a command line holds far less in practice).
pub const MAX_FORMAT_BYTES: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addr {
    Client,
    Peer,
    Local,
}

/// A header named by `%REQ(...)%`/`%RESP(...)%`: a header or one of the pseudo-headers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderKey {
    Method,
    Path,
    Authority,
    Scheme,
    Name(HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HeaderRef {
    name: HeaderKey,
    alternative: Option<HeaderKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    StartTime(Option<Vec<TimePart>>),
    Req(HeaderRef),
    Resp(HeaderRef),
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    RequestDuration,
    ResponseDuration,
    Protocol,
    UpstreamHost,
    UpstreamFailure,
    Address(Addr, bool),
    Hostname(String),
    ApiMethod,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Op(Op, Option<usize>),
}

/// A compiled `--access_log_format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    parts: Vec<Part>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
}

/// What one request's entry is rendered from.
pub struct Record<'a> {
    pub start: SystemTime,
    pub method: &'a str,
    /// The request target, credentials masked.
    pub path: &'a str,
    pub authority: Option<&'a str>,
    pub tls: bool,
    pub version: Version,
    /// 0 when no response was sent (the client left first).
    pub status: u16,
    /// Envoy's response flags, `-` for none.
    pub flags: &'a str,
    pub details: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub request_duration: Option<Duration>,
    pub response_duration: Option<Duration>,
    pub upstream_host: Option<&'a str>,
    pub upstream_failure: Option<&'a str>,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub api_method: Option<&'a str>,
    /// The client's headers the format reads ([`Format::request_headers`]).
    pub request_headers: &'a HeaderMap,
    pub response_headers: &'a HeaderMap,
    /// Headers of the matched method that carry its API key.
    pub key_headers: &'a [HeaderName],
    /// The credential query parameters masked in URL-like values (`Referer`).
    pub secrets: &'a portico_servicecontrol::redact::SecretParams,
}

impl Format {
    /// Compiles a format string; see the module docs for what is taken.
    pub fn parse(format: &str) -> Result<Format, FormatError> {
        if format.is_empty() {
            return Err(FormatError::Empty);
        }
        if format.len() > MAX_FORMAT_BYTES {
            return Err(FormatError::TooLong);
        }
        let b = format.as_bytes();
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'%' {
                let next = b[i..]
                    .iter()
                    .position(|&c| c == b'%')
                    .map_or(b.len(), |p| i + p);
                text.push_str(&format[i..next]);
                i = next;
                continue;
            }
            if b.get(i + 1) == Some(&b'%') {
                text.push('%');
                i += 2;
                continue;
            }
            let (op, max, end) = parse_op(format, i)?;
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Op(op, max));
            i = end;
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        match parts.last_mut() {
            Some(Part::Text(t)) if t.ends_with('\n') => {}
            Some(Part::Text(t)) => t.push('\n'),
            _ => parts.push(Part::Text("\n".into())),
        }
        let mut request_headers = Vec::new();
        let mut response_headers = Vec::new();
        for p in &parts {
            let (list, r) = match p {
                Part::Op(Op::Req(r), _) => (&mut request_headers, r),
                Part::Op(Op::Resp(r), _) => (&mut response_headers, r),
                _ => continue,
            };
            for k in std::iter::once(&r.name).chain(r.alternative.as_ref()) {
                if let HeaderKey::Name(n) = k {
                    if !list.contains(n) {
                        list.push(n.clone());
                    }
                }
            }
        }
        if parts.iter().any(|p| {
            matches!(
                p,
                Part::Op(
                    Op::Req(HeaderRef {
                        name: HeaderKey::Authority,
                        ..
                    }),
                    _
                )
            ) || matches!(
                p,
                Part::Op(
                    Op::Req(HeaderRef {
                        alternative: Some(HeaderKey::Authority),
                        ..
                    }),
                    _
                )
            )
        }) && !request_headers.contains(&http::header::HOST)
        {
            request_headers.push(http::header::HOST);
        }
        Ok(Format {
            parts,
            request_headers,
            response_headers,
        })
    }

    /// The request headers the format reads: kept from the client's request until its entry
    /// is written (nothing else is).
    pub fn request_headers(&self) -> &[HeaderName] {
        &self.request_headers
    }

    /// Whether the format reads the listener's own address (a system call per connection).
    pub fn reads_local_address(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Op(Op::Address(Addr::Local, _), _)))
    }

    /// The response headers the format reads: copied when the response head is decided.
    pub fn response_headers(&self) -> &[HeaderName] {
        &self.response_headers
    }

    /// One entry, newline included.
    pub fn render(&self, r: &Record<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let mut value = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Op(op, max) => {
                    value.clear();
                    let known = render_op(op, r, &mut value);
                    if !known {
                        out.push(b'-');
                        continue;
                    }
                    let v = match max {
                        Some(n) => truncate(&value, *n),
                        None => &value,
                    };
                    if matches!(op, Op::ApiMethod) {
                        // Already a JSON string, its controls escaped (as ESPv2 writes it).
                        out.extend_from_slice(v.as_bytes());
                    } else {
                        escape_into(v.as_bytes(), &mut out);
                    }
                }
            }
        }
        out
    }
}

/// The longest prefix of `s` of at most `n` bytes that ends on a character boundary.
fn truncate(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Copies a value, writing control characters, DEL and `\` escaped.
fn escape_into(v: &[u8], out: &mut Vec<u8>) {
    for &c in v {
        match c {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            c if c < 0x20 || c == 0x7f => {
                let _ = write!(VecWriter(out), "\\x{c:02x}");
            }
            c => out.push(c),
        }
    }
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Renders one operator into `s`; `false` when its value is not known (`-`).
fn render_op(op: &Op, r: &Record<'_>, s: &mut String) -> bool {
    match op {
        Op::StartTime(fmt) => {
            let t = time::OffsetDateTime::from(r.start);
            match fmt {
                None => {
                    let _ = write!(
                        s,
                        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                        t.year(),
                        u8::from(t.month()),
                        t.day(),
                        t.hour(),
                        t.minute(),
                        t.second(),
                        t.millisecond()
                    );
                }
                Some(parts) => strftime(parts, t, s),
            }
        }
        Op::Req(h) => return request_header(h, r, s),
        Op::Resp(h) => {
            let v = header_value(&h.name, r.response_headers).or_else(|| {
                h.alternative
                    .as_ref()
                    .and_then(|a| header_value(a, r.response_headers))
            });
            match v {
                Some(v) => push_lossy(s, v.as_bytes()),
                None => return false,
            }
        }
        Op::ResponseCode => {
            let _ = write!(s, "{}", r.status);
        }
        Op::ResponseFlags => s.push_str(r.flags),
        Op::ResponseCodeDetails => {
            if r.details.is_empty() {
                return false;
            }
            s.push_str(r.details)
        }
        Op::BytesReceived => {
            let _ = write!(s, "{}", r.bytes_received);
        }
        Op::BytesSent => {
            let _ = write!(s, "{}", r.bytes_sent);
        }
        Op::Duration => {
            let _ = write!(s, "{}", r.duration.as_millis());
        }
        Op::RequestDuration => match r.request_duration {
            Some(d) => {
                let _ = write!(s, "{}", d.as_millis());
            }
            None => return false,
        },
        Op::ResponseDuration => match r.response_duration {
            Some(d) => {
                let _ = write!(s, "{}", d.as_millis());
            }
            None => return false,
        },
        Op::Protocol => s.push_str(match r.version {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        }),
        Op::UpstreamHost => match r.upstream_host {
            Some(h) => s.push_str(h),
            None => return false,
        },
        Op::UpstreamFailure => match r.upstream_failure {
            Some(f) => s.push_str(f),
            None => return false,
        },
        Op::Address(which, with_port) => {
            let a = match which {
                Addr::Client => Some(r.client),
                Addr::Peer => Some(r.peer),
                Addr::Local => r.local,
            };
            let Some(a) = a else { return false };
            let _ = if *with_port {
                write!(s, "{a}")
            } else {
                write!(s, "{}", a.ip())
            };
        }
        Op::Hostname(h) => s.push_str(h),
        Op::ApiMethod => match r.api_method {
            Some(m) => json_string(m, s),
            None => return false,
        },
    }
    true
}

fn request_header(h: &HeaderRef, r: &Record<'_>, s: &mut String) -> bool {
    for key in std::iter::once(&h.name).chain(h.alternative.as_ref()) {
        match key {
            HeaderKey::Method => s.push_str(r.method),
            HeaderKey::Path => s.push_str(r.path),
            HeaderKey::Scheme => s.push_str(if r.tls { "https" } else { "http" }),
            HeaderKey::Authority => match r.authority.or_else(|| {
                r.request_headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            }) {
                Some(a) => s.push_str(a),
                None => continue,
            },
            HeaderKey::Name(n) => {
                let Some(v) = r.request_headers.get(n) else {
                    continue;
                };
                if CREDENTIAL_HEADERS.contains(&n.as_str()) || r.key_headers.contains(n) {
                    s.push_str(REDACTED);
                } else if n == http::header::REFERER || n.as_str() == "x-envoy-original-path" {
                    let text = String::from_utf8_lossy(v.as_bytes());
                    s.push_str(&r.secrets.redact(&text));
                } else {
                    push_lossy(s, v.as_bytes());
                }
            }
        }
        return true;
    }
    false
}

fn header_value<'h>(k: &HeaderKey, h: &'h HeaderMap) -> Option<&'h HeaderValue> {
    match k {
        HeaderKey::Name(n) if !CREDENTIAL_HEADERS.contains(&n.as_str()) => h.get(n),
        HeaderKey::Name(n) => h.get(n).map(|_| {
            static R: HeaderValue = HeaderValue::from_static(REDACTED);
            &R
        }),
        _ => None,
    }
}

/// Bytes as text; bytes that are not UTF-8 become U+FFFD.
fn push_lossy(s: &mut String, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(t) => s.push_str(t),
        Err(_) => {
            for c in String::from_utf8_lossy(b).chars() {
                s.push(c);
            }
        }
    }
}

/// A JSON string as Envoy's filter-state serialiser writes it (`<`, `>`, `&` as `\u00XX`).
fn json_string(v: &str, s: &mut String) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '<' | '>' | '&' => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// One `%NAME(arg):N%` starting at byte `at` (a `%`): the operator, its length cap and the
/// byte after it.
fn parse_op(f: &str, at: usize) -> Result<(Op, Option<usize>, usize), FormatError> {
    let b = f.as_bytes();
    let mut i = at + 1;
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let name = &f[at + 1..i];
    if name.is_empty() {
        return Err(FormatError::LonePercent { at });
    }
    let mut arg = None;
    if b.get(i) == Some(&b'(') {
        // START_TIME's argument may itself hold `%` and `)`: it ends at the first `)%` (or
        // `):`), as Envoy's parser reads it.
        let rest = &f[i + 1..];
        let close = rest
            .match_indices(')')
            .map(|(p, _)| p)
            .find(|p| matches!(rest.as_bytes().get(p + 1), Some(b'%') | Some(b':')))
            .ok_or_else(|| FormatError::UnclosedArgument {
                at,
                name: name.to_string(),
            })?;
        arg = Some(&rest[..close]);
        i = i + 1 + close + 1;
    }
    let mut max = None;
    if b.get(i) == Some(&b':') {
        let s = i + 1;
        let mut e = s;
        while e < b.len() && b[e].is_ascii_digit() {
            e += 1;
        }
        let n: usize = f[s..e]
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(FormatError::BadMaxLength { at: i })?;
        max = Some(n);
        i = e;
    }
    if b.get(i) != Some(&b'%') {
        return Err(FormatError::LonePercent { at });
    }
    let end = i + 1;
    let n = || name.to_string();
    let no_arg = |op: Op| -> Result<Op, FormatError> {
        if arg.is_some() {
            return Err(FormatError::NoArgument { at, name: n() });
        }
        if max.is_some() {
            return Err(FormatError::NoMaxLength { at });
        }
        Ok(op)
    };
    let addr = |prefix: &str| -> Option<bool> {
        match name.strip_prefix(prefix)? {
            "_ADDRESS" => Some(true),
            "_ADDRESS_WITHOUT_PORT" => Some(false),
            _ => None,
        }
    };
    let op = if let Some(p) = addr("DOWNSTREAM_REMOTE") {
        no_arg(Op::Address(Addr::Client, p))?
    } else if let Some(p) = addr("DOWNSTREAM_DIRECT_REMOTE") {
        no_arg(Op::Address(Addr::Peer, p))?
    } else if let Some(p) = addr("DOWNSTREAM_LOCAL") {
        no_arg(Op::Address(Addr::Local, p))?
    } else {
        match name {
            "START_TIME" => {
                if max.is_some() {
                    return Err(FormatError::NoMaxLength { at });
                }
                match arg {
                    None | Some("") => Op::StartTime(None),
                    Some(fmt) => Op::StartTime(Some(parse_strftime(fmt).map_err(|why| {
                        FormatError::TimeFormat {
                            at,
                            fmt: fmt.to_string(),
                            why,
                        }
                    })?)),
                }
            }
            "REQ" | "RESP" => {
                let arg = arg
                    .filter(|a| !a.trim().is_empty())
                    .ok_or_else(|| FormatError::NeedsArgument { at, name: n() })?;
                let key = |s: &str| -> Result<HeaderKey, FormatError> {
                    let s = s.trim();
                    let bad = || FormatError::BadHeader {
                        at,
                        name: n(),
                        arg: arg.to_string(),
                    };
                    if let Some(pseudo) = s.strip_prefix(':') {
                        return match pseudo.to_ascii_lowercase().as_str() {
                            "method" => Ok(HeaderKey::Method),
                            "path" => Ok(HeaderKey::Path),
                            "authority" => Ok(HeaderKey::Authority),
                            "scheme" => Ok(HeaderKey::Scheme),
                            _ => Err(bad()),
                        };
                    }
                    HeaderName::from_bytes(s.as_bytes())
                        .map(HeaderKey::Name)
                        .map_err(|_| bad())
                };
                let (a, alt) = match arg.split_once('?') {
                    Some((a, b)) => (key(a)?, Some(key(b)?)),
                    None => (key(arg)?, None),
                };
                let r = HeaderRef {
                    name: a,
                    alternative: alt,
                };
                if name == "REQ" {
                    Op::Req(r)
                } else {
                    Op::Resp(r)
                }
            }
            "FILTER_STATE" => {
                let key = arg
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| FormatError::NeedsArgument { at, name: n() })?;
                // Envoy's `FILTER_STATE(KEY:PLAIN)` form: the value is the same text here.
                let key = key
                    .strip_suffix(":PLAIN")
                    .or_else(|| key.strip_suffix(":TYPED"))
                    .unwrap_or(key);
                match key {
                    API_METHOD_STATE => Op::ApiMethod,
                    API_KEY_STATE => {
                        return Err(FormatError::ApiKeyState {
                            at,
                            key: key.to_string(),
                        })
                    }
                    _ => {
                        return Err(FormatError::UnknownState {
                            at,
                            key: key.to_string(),
                        })
                    }
                }
            }
            "RESPONSE_CODE" => no_arg(Op::ResponseCode)?,
            "RESPONSE_FLAGS" => no_arg(Op::ResponseFlags)?,
            "RESPONSE_CODE_DETAILS" => no_arg(Op::ResponseCodeDetails)?,
            "BYTES_RECEIVED" => no_arg(Op::BytesReceived)?,
            "BYTES_SENT" => no_arg(Op::BytesSent)?,
            "DURATION" => no_arg(Op::Duration)?,
            "REQUEST_DURATION" => no_arg(Op::RequestDuration)?,
            "RESPONSE_DURATION" => no_arg(Op::ResponseDuration)?,
            "PROTOCOL" => no_arg(Op::Protocol)?,
            "UPSTREAM_HOST" => no_arg(Op::UpstreamHost)?,
            "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_arg(Op::UpstreamFailure)?,
            "HOSTNAME" => no_arg(Op::Hostname(crate::header_rules::machine_hostname()))?,
            other if ENVOY_ONLY.contains(&other) || other.starts_with("DOWNSTREAM_") => {
                return Err(FormatError::Unsupported { at, name: n() })
            }
            _ => return Err(FormatError::Unknown { at, name: n() }),
        }
    };
    Ok((op, max, end))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimePart {
    Text(String),
    Year,
    Year2,
    Month,
    Day,
    DaySpace,
    Hour,
    Hour12,
    Minute,
    Second,
    DayOfYear,
    WeekdayShort,
    WeekdayLong,
    MonthShort,
    MonthLong,
    AmPm,
    Epoch,
    /// Fractional seconds with this many digits.
    Fraction(u8),
    /// Seconds then `.` and this many fractional digits (Envoy's `%E3S`).
    SecondsFraction(u8),
}

/// strftime with Envoy's fractional-second extensions; `Err` names the conversion refused.
fn parse_strftime(f: &str) -> Result<Vec<TimePart>, String> {
    use TimePart as T;
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = f.chars().peekable();
    let flush = |text: &mut String, out: &mut Vec<TimePart>| {
        if !text.is_empty() {
            out.push(T::Text(std::mem::take(text)));
        }
    };
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err("a '%' at the end starts no conversion".into());
        };
        let part = match spec {
            '%' => {
                text.push('%');
                continue;
            }
            'n' => {
                text.push('\n');
                continue;
            }
            't' => {
                text.push('\t');
                continue;
            }
            'Z' => {
                text.push_str("UTC");
                continue;
            }
            'z' => {
                text.push_str("+0000");
                continue;
            }
            'Y' => vec![T::Year],
            'y' => vec![T::Year2],
            'm' => vec![T::Month],
            'd' => vec![T::Day],
            'e' => vec![T::DaySpace],
            'H' => vec![T::Hour],
            'I' => vec![T::Hour12],
            'M' => vec![T::Minute],
            'S' => vec![T::Second],
            'j' => vec![T::DayOfYear],
            'a' => vec![T::WeekdayShort],
            'A' => vec![T::WeekdayLong],
            'b' | 'h' => vec![T::MonthShort],
            'B' => vec![T::MonthLong],
            'p' => vec![T::AmPm],
            's' => vec![T::Epoch],
            'f' => vec![T::Fraction(9)],
            'F' => vec![
                T::Year,
                T::Text("-".into()),
                T::Month,
                T::Text("-".into()),
                T::Day,
            ],
            'T' => vec![
                T::Hour,
                T::Text(":".into()),
                T::Minute,
                T::Text(":".into()),
                T::Second,
            ],
            'R' => vec![T::Hour, T::Text(":".into()), T::Minute],
            'D' => vec![
                T::Month,
                T::Text("/".into()),
                T::Day,
                T::Text("/".into()),
                T::Year2,
            ],
            'E' => {
                // %E<n>S (n digits) or %E*S (all nine).
                let n = match chars.next() {
                    Some('*') => 9,
                    Some(d @ '1'..='9') => d as u8 - b'0',
                    _ => return Err("%E must be followed by a digit 1-9 or * and S".into()),
                };
                if chars.next() != Some('S') {
                    return Err("%E must be followed by a digit 1-9 or * and S".into());
                }
                vec![T::SecondsFraction(n)]
            }
            d @ '1'..='9' => {
                if chars.next() != Some('f') {
                    return Err(format!("%{d} must be followed by f (%{d}f)"));
                }
                vec![T::Fraction(d as u8 - b'0')]
            }
            other => return Err(format!("%{other} is not a conversion Portico supports")),
        };
        flush(&mut text, &mut out);
        out.extend(part);
    }
    flush(&mut text, &mut out);
    Ok(out)
}

fn strftime(parts: &[TimePart], t: time::OffsetDateTime, s: &mut String) {
    use TimePart as T;
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let fraction = |s: &mut String, n: u8| {
        let nanos = format!("{:09}", t.nanosecond());
        s.push_str(&nanos[..usize::from(n.min(9))]);
    };
    for p in parts {
        let _ = match p {
            T::Text(x) => {
                s.push_str(x);
                Ok(())
            }
            T::Year => write!(s, "{:04}", t.year()),
            T::Year2 => write!(s, "{:02}", t.year().rem_euclid(100)),
            T::Month => write!(s, "{:02}", u8::from(t.month())),
            T::Day => write!(s, "{:02}", t.day()),
            T::DaySpace => write!(s, "{:2}", t.day()),
            T::Hour => write!(s, "{:02}", t.hour()),
            T::Hour12 => write!(s, "{:02}", (t.hour() + 11) % 12 + 1),
            T::Minute => write!(s, "{:02}", t.minute()),
            T::Second => write!(s, "{:02}", t.second()),
            T::DayOfYear => write!(s, "{:03}", t.ordinal()),
            T::WeekdayShort => {
                s.push_str(&DAYS[usize::from(t.weekday().number_days_from_monday())][..3]);
                Ok(())
            }
            T::WeekdayLong => {
                s.push_str(DAYS[usize::from(t.weekday().number_days_from_monday())]);
                Ok(())
            }
            T::MonthShort => {
                s.push_str(&MONTHS[usize::from(u8::from(t.month()) - 1)][..3]);
                Ok(())
            }
            T::MonthLong => {
                s.push_str(MONTHS[usize::from(u8::from(t.month()) - 1)]);
                Ok(())
            }
            T::AmPm => {
                s.push_str(if t.hour() < 12 { "AM" } else { "PM" });
                Ok(())
            }
            T::Epoch => write!(s, "{}", t.unix_timestamp()),
            T::Fraction(n) => {
                fraction(s, *n);
                Ok(())
            }
            T::SecondsFraction(n) => {
                let _ = write!(s, "{:02}.", t.second());
                fraction(s, *n);
                Ok(())
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SECRETS: std::sync::LazyLock<portico_servicecontrol::redact::SecretParams> =
        std::sync::LazyLock::new(Default::default);

    fn record<'a>(req: &'a HeaderMap, resp: &'a HeaderMap) -> Record<'a> {
        Record {
            // 2021-03-04T05:06:07.089123456Z
            start: SystemTime::UNIX_EPOCH + Duration::new(1_614_834_367, 89_123_456),
            method: "GET",
            path: "/echo?key=*****",
            authority: None,
            tls: false,
            version: Version::HTTP_11,
            status: 200,
            flags: "-",
            details: "via_upstream",
            bytes_received: 12,
            bytes_sent: 34,
            duration: Duration::from_millis(56),
            request_duration: Some(Duration::from_millis(1)),
            response_duration: None,
            upstream_host: Some("127.0.0.1:8082"),
            upstream_failure: None,
            client: "10.0.0.1:0".parse().unwrap(),
            peer: "127.0.0.1:4000".parse().unwrap(),
            local: None,
            api_method: Some("e2e.Api.Echo"),
            request_headers: req,
            response_headers: resp,
            key_headers: &[],
            secrets: &SECRETS,
        }
    }

    fn render(f: &str, req: &HeaderMap, resp: &HeaderMap) -> String {
        let f = Format::parse(f).unwrap_or_else(|e| panic!("{f:?}: {e}"));
        String::from_utf8(f.render(&record(req, resp))).unwrap()
    }

    #[test]
    fn every_operator_renders() {
        let mut req = HeaderMap::new();
        req.insert("user-agent", HeaderValue::from_static("curl/8"));
        req.insert("host", HeaderValue::from_static("api.example"));
        req.insert("x-long", HeaderValue::from_static("abcdefghij"));
        let mut resp = HeaderMap::new();
        resp.insert("content-type", HeaderValue::from_static("text/plain"));
        let h = |f: &str| render(f, &req, &resp);
        assert_eq!(h("%START_TIME%"), "2021-03-04T05:06:07.089Z\n");
        assert_eq!(
            h("%START_TIME(%Y/%m/%d %H:%M:%S %z)%"),
            "2021/03/04 05:06:07 +0000\n"
        );
        assert_eq!(
            h("%START_TIME(%s.%3f|%E6S|%9f)%"),
            "1614834367.089|07.089123|089123456\n"
        );
        assert_eq!(
            h("%START_TIME(%a %b %e %j %p %I)%"),
            "Thu Mar  4 063 AM 05\n"
        );
        assert_eq!(
            h("%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"),
            "GET /echo?key=***** HTTP/1.1\n"
        );
        assert_eq!(h("%REQ(:AUTHORITY)% %REQ(:SCHEME)%"), "api.example http\n");
        assert_eq!(h("%REQ(USER-AGENT)% %REQ(x-missing)%"), "curl/8 -\n");
        assert_eq!(h("%REQ(x-missing?User-Agent)%"), "curl/8\n");
        assert_eq!(h("%REQ(X-LONG):4%"), "abcd\n");
        assert_eq!(h("%RESP(content-type)% %RESP(x-none)%"), "text/plain -\n");
        assert_eq!(
            h("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"),
            "200 - via_upstream\n"
        );
        assert_eq!(h("%BYTES_RECEIVED% %BYTES_SENT%"), "12 34\n");
        assert_eq!(
            h("%DURATION% %REQUEST_DURATION% %RESPONSE_DURATION%"),
            "56 1 -\n"
        );
        assert_eq!(
            h("%UPSTREAM_HOST% %UPSTREAM_TRANSPORT_FAILURE_REASON%"),
            "127.0.0.1:8082 -\n"
        );
        assert_eq!(
            h("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
            "10.0.0.1:0 10.0.0.1\n"
        );
        assert_eq!(
            h("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%"),
            "127.0.0.1:4000 -\n"
        );
        assert_eq!(
            h(&format!("%FILTER_STATE({API_METHOD_STATE}):70%")),
            "\"e2e.Api.Echo\"\n"
        );
        assert_eq!(h("100%% done\n"), "100% done\n");
        assert_eq!(h("a\nb\n"), "a\nb\n");
    }

    #[test]
    fn unknown_operation_is_json_escaped_as_espv2_writes_it() {
        let (req, resp) = (HeaderMap::new(), HeaderMap::new());
        let f = Format::parse(&format!("%FILTER_STATE({API_METHOD_STATE})%")).unwrap();
        let mut r = record(&req, &resp);
        r.api_method = Some("<Unknown Operation Name>");
        assert_eq!(
            String::from_utf8(f.render(&r)).unwrap(),
            "\"\\u003cUnknown Operation Name\\u003e\"\n"
        );
        r.api_method = None;
        assert_eq!(String::from_utf8(f.render(&r)).unwrap(), "-\n");
    }

    #[test]
    fn values_cannot_forge_lines_and_secrets_are_not_written() {
        let mut req = HeaderMap::new();
        // Header values cannot hold CR/LF on the wire, but can hold other controls and bytes.
        req.insert(
            "user-agent",
            HeaderValue::from_bytes(b"a\t[31m\\x0a\xff").unwrap(),
        );
        req.insert("authorization", HeaderValue::from_static("Bearer abc"));
        req.insert("x-api-key", HeaderValue::from_static("k"));
        req.insert("x-my-key", HeaderValue::from_static("k2"));
        req.insert(
            "referer",
            HeaderValue::from_static("https://a.example/?key=secret"),
        );
        let resp = HeaderMap::new();
        let f = Format::parse(
            "%REQ(user-agent)% %REQ(authorization)% %REQ(x-api-key)% %REQ(x-my-key)% %REQ(referer)%",
        )
        .unwrap();
        let mut r = record(&req, &resp);
        let keys = [HeaderName::from_static("x-my-key")];
        r.key_headers = &keys;
        let out = f.render(&r);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "a\\t[31m\\\\x0a\u{fffd} [REDACTED] [REDACTED] [REDACTED] https://a.example/?key=…\n"
        );
        assert_eq!(out.iter().filter(|c| **c == b'\n').count(), 1);
        // A path (or anything else) holding a line break renders it escaped.
        let mut r = record(&req, &resp);
        r.path = "/a\r\n127.0.0.1 - forged";
        let f = Format::parse("%REQ(:PATH)%").unwrap();
        assert_eq!(
            String::from_utf8(f.render(&r)).unwrap(),
            "/a\\r\\n127.0.0.1 - forged\n"
        );
    }

    #[test]
    fn bad_formats_are_refused_precisely() {
        let e = |f: &str| Format::parse(f).unwrap_err().to_string();
        assert!(
            e("%FOO%").contains("byte 0: %FOO% is not an Envoy command operator"),
            "{}",
            e("%FOO%")
        );
        assert!(e("ab%UPSTREAM_CLUSTER%").contains(
            "byte 2: %UPSTREAM_CLUSTER% is an Envoy command operator that Portico does not support"
        ));
        assert!(e("50%").contains("the '%' at byte 2 starts no command operator"));
        assert!(e("%PROTOCOL").contains("byte 0 starts no"));
        assert!(e("%REQ(x-a%").contains("'(' of %REQ(...)% is not closed"));
        assert!(e("%REQ()%").contains("needs an argument"));
        assert!(e("%REQ(bad header)%").contains("is not a header name"));
        assert!(e("%REQ(:nope)%").contains("is not a header name"));
        assert!(e("%REQ(x):0%").contains("whole number above 0"));
        assert!(e("%REQ(x):%").contains("whole number above 0"));
        assert!(e("%PROTOCOL(x)%").contains("takes no argument"));
        assert!(e("%DURATION:3%").contains("only applies"));
        assert!(e("%START_TIME(%Q)%").contains("%Q is not a conversion"));
        assert!(e("%START_TIME(%E0S)%").contains("%E must be followed"));
        assert!(
            e("%FILTER_STATE(com.google.espv2.filters.http.service_control.api_key):30%")
                .contains("never writes API keys")
        );
        assert!(e("%FILTER_STATE(x.y)%").contains("the only filter state"));
        assert!(e("").contains("empty"));
        assert!(e(&"a".repeat(MAX_FORMAT_BYTES + 1)).contains("longer"));
        // Never a panic, whatever the text.
        for f in [
            "%",
            "%%%",
            "%(",
            "%A(",
            "%REQ(",
            "%REQ(a)",
            "%REQ(a):",
            "%\u{e9}%",
            "%START_TIME(%",
        ] {
            let _ = Format::parse(f);
        }
    }
}
