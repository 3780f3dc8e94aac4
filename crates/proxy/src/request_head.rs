//! The request head, settled before the policy sees it: the method and the path the backend
//! will run are the method and the path that are matched, checked and reported.
//!
//! [`settle`] is what [`crate::pipeline`] runs first on every request, in this order:
//!
//! 1. **method** ([`effective_method`]): the request method must be an upper-case token (nginx's
//!    rule: `A`–`Z`, `_`, `-`), else 400; `CONNECT` and `TRACE` are 405, as nginx answers them
//!    (a CONNECT tunnel would bypass every check). A single, valid
//!    `X-HTTP-Method-Override` replaces it: the override is what is matched **and forwarded**;
//! 2. **headers** ([`sanitize_headers`]): names with `_` are dropped unless
//!    `--underscores_in_headers` (nginx's `underscores_in_headers off`, which CGI/WSGI/Rack
//!    backends need: they read `X_Foo` and `X-Foo` as the same variable), or, ESPv2's way
//!    ([`HeadOptions::refuse_underscores`]), the request is refused with 400; the headers the
//!    proxy itself sets or acts on, and `X-Original-URL`/`X-Rewrite-URL` (which some backends
//!    route on), are removed from the client's request in every spelling, flag or not (see
//!    [`is_proxy_owned`]), and so is `X-Forwarded-Client-Cert` when
//!    [`HeadOptions::sanitize_client_cert`];
//! 3. **path** ([`normalize_target`]): escaped unreserved characters decoded (`%73` is `s`),
//!    dot segments removed (also `%2e`-encoded ones), `\` read as `/`, repeated slashes merged;
//!    refused when an encoded slash or backslash would form a dot or empty segment once
//!    decoded, for `..;` segments, for a `%` that starts no escape, and for an encoded NUL. The
//!    query is never touched. ESPv2's `--disable_normalize_path`, `--disable_merge_slashes_in_path` and
//!    `--disallow_escaped_slashes_in_path` change the rules ([`PathOptions`]).
//!
//! Every function here is pure and panic-free, so a fuzz target can call them on any input.
//! Paths that are already normal (nearly all) are returned borrowed: no allocation.
//! API-key extraction ([`crate::auth::api_key::extract_api_key`]) is pure in the same way, and
//! the same fuzz target runs it.

use crate::error::{Cause, Code, EspError};
use http::header::{HeaderMap, HeaderName};
use http::Method;
use std::borrow::Cow;

/// The override header the proxy honours.
pub static X_HTTP_METHOD_OVERRIDE: HeaderName = HeaderName::from_static("x-http-method-override");

/// Headers the proxy sets towards the backend (ESP's `X-Endpoint-API-UserInfo`,
/// `X-Endpoint-API-Project-ID`, and any future `X-Endpoint-API-*`): a client copy is never
/// forwarded, whatever its spelling.
const IDENTITY_PREFIX: &[u8] = b"x-endpoint-api-";
/// Method overrides: the proxy reads only the first one and removes them all, so a backend that
/// honours another (or another spelling) cannot run a method the policy did not match.
const OVERRIDE_HEADERS: [&[u8]; 3] = [
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
];
/// Headers that name another request target: IIS URL Rewrite and Symfony/Zend applications route
/// on them, so a backend could run a path other than the one matched and checked. Removed in
/// every spelling, like the method overrides.
const TARGET_OVERRIDE_HEADERS: [&[u8]; 2] = [b"x-original-url", b"x-rewrite-url"];
/// Headers the proxy sets by their canonical name (replacing or appending to the client's);
/// other spellings of them would reach a CGI-style backend as the same variable.
const FORWARDING_HEADERS: [&[u8]; 3] = [b"x-forwarded-for", b"x-real-ip", b"x-google-real-ip"];

// ---------------------------------------------------------------------------------------------
// Method.
// ---------------------------------------------------------------------------------------------

/// Why the method was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error("The request method is not an upper-case token.")]
    NotUpperCaseToken,
    #[error("X-HTTP-Method-Override must be one upper-case token.")]
    BadOverride,
    #[error("X-HTTP-Method-Override is given more than once.")]
    RepeatedOverride,
    #[error("The {0} method is not allowed.")]
    NotAllowed(Method),
}

/// nginx's method syntax: one or more of `A`–`Z`, `_` and `-`. Lower- or mixed-case methods are
/// refused because matching is case-sensitive while many frameworks upper-case the method, so
/// `delete` would be checked as an unknown method and run as `DELETE`.
pub fn is_upper_case_token(b: &[u8]) -> bool {
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || *c == b'_' || *c == b'-')
}

fn refused(m: &Method) -> bool {
    *m == Method::CONNECT || *m == Method::TRACE
}

/// The method the request will be matched, checked, reported and forwarded with: the request
/// method, or a single valid `X-HTTP-Method-Override`.
pub fn effective_method(method: &Method, headers: &HeaderMap) -> Result<Method, MethodError> {
    if !is_upper_case_token(method.as_str().as_bytes()) {
        return Err(MethodError::NotUpperCaseToken);
    }
    if refused(method) {
        return Err(MethodError::NotAllowed(method.clone()));
    }
    let mut values = headers.get_all(&X_HTTP_METHOD_OVERRIDE).iter();
    let Some(value) = values.next() else {
        return Ok(method.clone());
    };
    if values.next().is_some() {
        return Err(MethodError::RepeatedOverride);
    }
    let b = value.as_bytes();
    if !is_upper_case_token(b) {
        return Err(MethodError::BadOverride);
    }
    let m = Method::from_bytes(b).map_err(|_| MethodError::BadOverride)?;
    if refused(&m) {
        return Err(MethodError::NotAllowed(m));
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Headers.
// ---------------------------------------------------------------------------------------------

/// `name` equals `canon` (lower case, `-`) ignoring ASCII case and reading `_` as `-`: how
/// CGI, WSGI, PHP and Rack name header variables (`HTTP_X_REAL_IP`).
fn same_spelling(name: &[u8], canon: &[u8]) -> bool {
    name.len() == canon.len() && starts_with_spelling(name, canon)
}

fn starts_with_spelling(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len()
        && name.iter().zip(prefix).all(|(n, p)| {
            let n = n.to_ascii_lowercase();
            n == *p || (n == b'_' && *p == b'-')
        })
}

/// A client header the proxy removes even with `--underscores_in_headers`: any spelling of an
/// `X-Endpoint-API-*` header, of a method override or of `X-Original-URL`/`X-Rewrite-URL`, and
/// the non-canonical spellings of the forwarding headers the proxy sets.
pub fn is_proxy_owned(name: &[u8]) -> bool {
    if name.first().map(u8::to_ascii_lowercase) != Some(b'x') {
        return false;
    }
    starts_with_spelling(name, IDENTITY_PREFIX)
        || OVERRIDE_HEADERS.iter().any(|c| same_spelling(name, c))
        || TARGET_OVERRIDE_HEADERS
            .iter()
            .any(|c| same_spelling(name, c))
        || (name.contains(&b'_') && FORWARDING_HEADERS.iter().any(|c| same_spelling(name, c)))
}

/// Whether a client header is dropped before anything reads it.
pub fn is_dropped(name: &[u8], underscores_in_headers: bool) -> bool {
    (!underscores_in_headers && name.contains(&b'_')) || is_proxy_owned(name)
}

/// Removes the client headers [`is_dropped`] names; returns how many names went. One pass over
/// the names; allocates only when something is removed.
pub fn sanitize_headers(headers: &mut HeaderMap, underscores_in_headers: bool) -> usize {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_dropped(n.as_str().as_bytes(), underscores_in_headers))
        .cloned()
        .collect();
    for n in &doomed {
        headers.remove(n);
    }
    doomed.len()
}

// ---------------------------------------------------------------------------------------------
// Path.
// ---------------------------------------------------------------------------------------------

/// How paths are normalised (ESPv2's flags; the defaults are ESPv2's, plus the refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathOptions {
    /// Decode escaped unreserved characters, remove `.`/`..` segments (also `%2e`-encoded),
    /// read `\` as `/`; refuse encoded separators that would form a dot or empty segment once
    /// decoded, `..;` segments and malformed escapes. Off with `--disable_normalize_path`.
    pub normalize: bool,
    /// Merge repeated slashes. Off with `--disable_merge_slashes_in_path`.
    pub merge_slashes: bool,
    /// `--disallow_escaped_slashes_in_path`: decode `%2F` and `%5C` before normalising; the
    /// caller redirects the client to the result (gRPC: refuses), as ESPv2 does.
    pub unescape_slashes: bool,
}

impl Default for PathOptions {
    fn default() -> Self {
        PathOptions {
            normalize: true,
            merge_slashes: true,
            unescape_slashes: false,
        }
    }
}

/// Why a path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("The request target is not an absolute path.")]
    NotAbsolutePath,
    #[error("The request path holds an encoded NUL (%00).")]
    EncodedNul,
    #[error(
        "The request path holds an encoded slash or backslash that would form a dot segment or \
         an empty segment once decoded."
    )]
    EncodedSeparator,
    #[error("The request path holds a dot segment with parameters (\"..;\").")]
    DotSegmentWithParameters,
    #[error("The request path holds an empty segment with parameters (\"/;\").")]
    EmptySegmentWithParameters,
    #[error("The request path holds a '%' that does not start a percent-encoded byte.")]
    MalformedEscape,
}

/// A normalised path or target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    /// The text, borrowed when nothing changed.
    pub text: Cow<'a, str>,
    /// `%2F`/`%5C` were decoded ([`PathOptions::unescape_slashes`]).
    pub unescaped_slashes: bool,
}

/// The path part of a request target (up to the first `?`).
pub fn path_of(target: &str) -> &str {
    match target.find('?') {
        Some(i) => &target[..i],
        None => target,
    }
}

/// Normalises the path of a request target (`/path?query`); the query is kept byte for byte.
pub fn normalize_target(target: &str, opts: PathOptions) -> Result<Normalized<'_>, PathError> {
    let path = path_of(target);
    let n = normalize_path(path, opts)?;
    let text = match n.text {
        Cow::Borrowed(_) => Cow::Borrowed(target),
        Cow::Owned(mut p) => {
            p.push_str(&target[path.len()..]);
            Cow::Owned(p)
        }
    };
    Ok(Normalized {
        text,
        unescaped_slashes: n.unescaped_slashes,
    })
}

/// The `Location` a `--disallow_escaped_slashes_in_path` redirect sends the client to: the
/// decoded target with its leading run of `/` and `\` made one `/`. A target starting with `//`
/// or `/\` is a protocol-relative URL to browsers and most clients (`/%2Fevil.com` would send
/// them to `//evil.com`, another host), whatever the path flags say.
pub fn redirect_target(target: &str) -> Cow<'_, str> {
    let rest = target.trim_start_matches(['/', '\\']);
    if target.len() - rest.len() <= 1 && target.starts_with('/') {
        return Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(rest.len() + 1);
    out.push('/');
    out.push_str(rest);
    Cow::Owned(out)
}

/// The hot-path test: only a path with `%`, `\`, `//` or a segment starting with `.` or `;` can
/// change or be refused.
fn may_change(path: &[u8], opts: PathOptions) -> bool {
    let mut prev = 0u8;
    for &b in path {
        match b {
            b'%' => return true,
            b'\\' if opts.normalize => return true,
            b'/' if prev == b'/' && opts.merge_slashes => return true,
            b'.' | b';' if prev == b'/' && opts.normalize => return true,
            _ => {}
        }
        prev = b;
    }
    false
}

/// `%XY` at `i` where `XY` names `/` or `\` (any case).
fn encoded_separator_at(b: &[u8], i: usize) -> bool {
    matches!(
        (b.get(i), b.get(i + 1), b.get(i + 2)),
        (Some(b'%'), Some(b'2'), Some(b'f' | b'F')) | (Some(b'%'), Some(b'5'), Some(b'c' | b'C'))
    )
}

/// Decodes `%2F`→`/` and `%5C`→`\` (one level, left to right, as Envoy's unescape does).
fn unescape_slashes(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    if !(0..b.len()).any(|i| encoded_separator_at(b, i)) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if encoded_separator_at(b, i) {
            out.push_str(&path[start..i]);
            out.push(if b[i + 1] == b'2' { '/' } else { '\\' });
            i += 3;
            start = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&path[start..]);
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte `%XY` at `i` encodes, if it is a well-formed escape.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    if b.get(i) != Some(&b'%') {
        return None;
    }
    Some(hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?)
}

/// RFC 3986's unreserved characters: encoding them changes nothing, so `%73` is `s`.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Checks every `%` of a path: an encoded NUL is refused always; with `strict`, so is a `%`
/// that starts no escape (otherwise decoding `%%32F` would make a new `%2F`). Returns whether
/// some escape encodes an unreserved character.
fn scan_escapes(b: &[u8], strict: bool) -> Result<bool, PathError> {
    let mut unreserved = false;
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| c == b'%'))
    {
        let at = i + off;
        match escape_at(b, at) {
            Some(0) => return Err(PathError::EncodedNul),
            Some(c) => {
                unreserved |= is_unreserved(c);
                i = at + 3;
            }
            None if strict => return Err(PathError::MalformedEscape),
            None => i = at + 1,
        }
    }
    Ok(unreserved)
}

/// Appends `seg` with its escaped unreserved characters decoded.
fn push_decoding_unreserved(out: &mut String, seg: &str) {
    let b = seg.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match escape_at(b, i) {
            Some(c) if is_unreserved(c) => {
                out.push_str(&seg[start..i]);
                out.push(char::from(c));
                i += 3;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&seg[start..]);
}

/// 1 for `.`, 2 for `..`, each dot plain or `%2e`/`%2E`; `None` otherwise.
fn dots(s: &str) -> Option<u8> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0u8;
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b[i] == b'%'
            && b.get(i + 1) == Some(&b'2')
            && matches!(b.get(i + 2), Some(b'e' | b'E'))
        {
            i += 3;
        } else {
            return None;
        }
        n += 1;
        if n > 2 {
            return None;
        }
    }
    (n > 0).then_some(n)
}

/// The part of a segment before its `;` parameters, and whether it had any.
fn before_params(seg: &str) -> (&str, bool) {
    match seg.find(';') {
        Some(i) => (&seg[..i], true),
        None => (seg, false),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Segment {
    Empty,
    Dot,
    DotDot,
    Regular,
}

/// Classifies one segment (normalisation on) and refuses the ambiguous ones.
fn classify(seg: &str) -> Result<Segment, PathError> {
    if seg.is_empty() {
        return Ok(Segment::Empty);
    }
    let (head, params) = before_params(seg);
    if head.is_empty() {
        // Servlet containers drop `;x` and then merge the empty segment left behind, so `/;x/a`
        // would be checked as one path (`/**`) and run as `/a`.
        return Err(PathError::EmptySegmentWithParameters);
    }
    if let Some(n) = dots(head) {
        if params {
            // Servlet containers drop `;...` and then resolve the `..`.
            return Err(PathError::DotSegmentWithParameters);
        }
        return Ok(if n == 1 {
            Segment::Dot
        } else {
            Segment::DotDot
        });
    }
    let b = seg.as_bytes();
    if b.contains(&b'%') && (0..b.len()).any(|i| encoded_separator_at(b, i)) {
        // Each piece between encoded separators must be a plain, non-empty, non-dot segment:
        // `a%2Fb` is an object name; `..%2F`, `%2F..`, `x%2F` and `%2F%2F` are not, nor is `x%2F;p` (an empty segment with parameters).
        let mut start = 0;
        let mut i = 0;
        let check = |piece: &str| -> Result<(), PathError> {
            let head = before_params(piece).0;
            if head.is_empty() || dots(head).is_some() {
                Err(PathError::EncodedSeparator)
            } else {
                Ok(())
            }
        };
        while i < b.len() {
            if encoded_separator_at(b, i) {
                check(&seg[start..i])?;
                i += 3;
                start = i;
            } else {
                i += 1;
            }
        }
        check(&seg[start..])?;
    }
    Ok(Segment::Regular)
}

fn classify_with(seg: &str, opts: PathOptions) -> Result<Segment, PathError> {
    if opts.normalize {
        classify(seg)
    } else if seg.is_empty() {
        Ok(Segment::Empty)
    } else {
        Ok(Segment::Regular)
    }
}

/// Removes the last segment of `out` (which ends with `/`), never above the root.
fn pop_segment(out: &mut String) {
    if out.len() <= 1 {
        return;
    }
    out.pop();
    let keep = out.rfind('/').map_or(1, |i| i + 1);
    out.truncate(keep);
}

/// Normalises a path (no query). See the module docs and docs/security.md for the rules.
pub fn normalize_path(path: &str, opts: PathOptions) -> Result<Normalized<'_>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolutePath);
    }
    if !may_change(path.as_bytes(), opts) {
        return Ok(Normalized {
            text: Cow::Borrowed(path),
            unescaped_slashes: false,
        });
    }
    let decoded = if opts.unescape_slashes {
        unescape_slashes(path)
    } else {
        Cow::Borrowed(path)
    };
    let unescaped_slashes = matches!(decoded, Cow::Owned(_));
    let p: &str = &decoded;
    let unreserved_escapes = scan_escapes(p.as_bytes(), opts.normalize)?;
    let is_sep = |c: char| c == '/' || (opts.normalize && c == '\\');
    let body = p.get(1..).unwrap_or("");

    // First pass: refuse, and find out whether anything changes (usually not: no allocation).
    let mut changed =
        unescaped_slashes || (opts.normalize && (unreserved_escapes || body.contains('\\')));
    let mut segments = body.split(is_sep).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match classify_with(seg, opts)? {
            Segment::Dot | Segment::DotDot => changed = true,
            Segment::Empty if !last && opts.merge_slashes => changed = true,
            _ => {}
        }
    }
    if !changed {
        return Ok(Normalized {
            text: Cow::Borrowed(path),
            unescaped_slashes: false,
        });
    }

    // Second pass: `out` ends with `/` except right after a final regular segment.
    let mut out = String::with_capacity(p.len());
    out.push('/');
    let mut segments = body.split(is_sep).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match classify_with(seg, opts)? {
            Segment::Dot => {}
            Segment::DotDot => pop_segment(&mut out),
            Segment::Empty => {
                if !last && !opts.merge_slashes {
                    out.push('/');
                }
            }
            Segment::Regular => {
                if opts.normalize {
                    push_decoding_unreserved(&mut out, seg);
                } else {
                    out.push_str(seg);
                }
                if !last {
                    out.push('/');
                }
            }
        }
    }
    Ok(Normalized {
        text: Cow::Owned(out),
        unescaped_slashes,
    })
}

/// The path with every segment's `;` parameters removed and then normalised with repeated
/// slashes merged, as servlet containers read it (`/a;x/b;v=1` → `/a/b`, `/a;x//b` → `/a/b`).
/// The pipeline refuses a path whose parameters change the method it matches. `None` when
/// the stripped path would be refused ([`normalize_path`]).
pub fn servlet_path(path: &str) -> Option<Cow<'_, str>> {
    let stripped = without_segment_parameters(path);
    let opts = PathOptions {
        normalize: true,
        merge_slashes: true,
        unescape_slashes: false,
    };
    match stripped {
        Cow::Borrowed(p) => normalize_path(p, opts).ok().map(|n| n.text),
        Cow::Owned(p) => {
            let changed = match normalize_path(&p, opts).ok()?.text {
                Cow::Borrowed(_) => None,
                Cow::Owned(n) => Some(n),
            };
            Some(Cow::Owned(changed.unwrap_or(p)))
        }
    }
}

/// The path with every segment's `;` parameters removed (`/a;x/b;v=1` → `/a/b`), nothing else
/// changed; [`servlet_path`] also normalises the result.
pub fn without_segment_parameters(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(before_params(seg).0);
    }
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------
// Host.
// ---------------------------------------------------------------------------------------------

/// Why the `Host` header was refused (400, as nginx answers both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("The request has more than one Host header.")]
    Repeated,
    #[error("An HTTP/1.1 request must have a Host header.")]
    Missing,
}

/// nginx's Host rules: two `Host` headers are refused in any version (the proxy and the
/// backend could each read another one); an HTTP/1.1 request needs one unless its target is in
/// absolute form (`has_authority`). HTTP/1.0 may omit it, and HTTP/2 names the host in
/// `:authority`, which is not a header.
pub fn check_host(
    version: http::Version,
    headers: &HeaderMap,
    has_authority: bool,
) -> Result<(), HostError> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(HostError::Repeated),
        (None, _) if version == http::Version::HTTP_11 && !has_authority => Err(HostError::Missing),
        _ => Ok(()),
    }
}

/// Whether the request's `Transfer-Encoding` (if any) is the one coding the proxy can forward:
/// a single `chunked`, any case. The body is re-chunked towards the backend and the header is
/// hop-by-hop, so another coding before `chunked` (`gzip, chunked`) would be dropped and the
/// backend would read coded bytes as the body; nginx answers such requests 501.
pub fn transfer_coding_supported(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&c| c == b','));
    match codings.next() {
        None => true,
        Some(first) => {
            first.trim_ascii().eq_ignore_ascii_case(b"chunked") && codings.next().is_none()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The whole head.
// ---------------------------------------------------------------------------------------------

/// What [`settle`] needs from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeadOptions {
    /// `--underscores_in_headers`: names with `_` are kept.
    pub underscores_in_headers: bool,
    /// Without `--underscores_in_headers`, a request with a `_` in a header name is refused
    /// (400) instead of having those headers dropped: ESPv2's default (Envoy's
    /// `headers_with_underscores_action: REJECT_REQUEST`). `false`: nginx's dropping (ESP).
    pub refuse_underscores: bool,
    /// Remove the client's `X-Forwarded-Client-Cert` in every spelling: Envoy's default
    /// (`forward_client_cert_details: SANITIZE`), so always for ESPv2, and for ESP when clients
    /// present certificates (downstream mTLS), where a backend could read it as the proxy's
    /// word about the client's certificate.
    pub sanitize_client_cert: bool,
    pub path: PathOptions,
    /// ESPv2's `--generated_header_prefix` (lower case, with `api-`): client headers starting
    /// with it, in any spelling, are removed like `X-Endpoint-API-*` ones, so none can pass for
    /// a header the proxy generates ([`crate::settings::GeneratedHeaders`]).
    pub generated_prefix: Option<&'static str>,
}

/// The header Envoy and other mTLS-terminating proxies use to tell the backend about the
/// client's certificate.
const CLIENT_CERT_HEADER: &[u8] = b"x-forwarded-client-cert";

/// The first header name holding `_`, if any.
pub fn underscore_name(headers: &HeaderMap) -> Option<&HeaderName> {
    headers.keys().find(|n| n.as_str().contains('_'))
}

/// Removes every spelling (any case, `_` for `-`) of `canon` (lower case); returns how many
/// names went.
fn remove_spellings(headers: &mut HeaderMap, canon: &[u8]) -> usize {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| same_spelling(n.as_str().as_bytes(), canon))
        .cloned()
        .collect();
    for n in &doomed {
        headers.remove(n);
    }
    doomed.len()
}

/// Removes every header whose name starts with `prefix` (lower case) in any spelling (any
/// case, `_` for `-`); returns how many names went.
fn remove_prefixed(headers: &mut HeaderMap, prefix: &[u8]) -> usize {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| starts_with_spelling(n.as_str().as_bytes(), prefix))
        .cloned()
        .collect();
    for n in &doomed {
        headers.remove(n);
    }
    doomed.len()
}

/// Why the head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error(transparent)]
    Method(#[from] MethodError),
    /// The method was fine (it is kept for the logs); the path was not.
    #[error("{error}")]
    Path { method: Method, error: PathError },
    /// The method was fine; the `Host` header was not.
    #[error("{error}")]
    Host { method: Method, error: HostError },
    /// The method was fine; the body has a transfer coding other than `chunked` (501).
    #[error("The request's Transfer-Encoding is not supported: only chunked is.")]
    TransferCoding { method: Method },
    /// A header name holds `_` and the proxy refuses those ([`HeadOptions::refuse_underscores`]).
    /// The answer is Envoy's words for it, `Bad Request`; the name is logged.
    #[error("Bad Request")]
    UnderscoreInName { name: String },
}

impl HeadError {
    /// The method to log and report for the refused request, when it was valid.
    pub fn method(&self) -> Option<&Method> {
        match self {
            HeadError::Method(_) | HeadError::UnderscoreInName { .. } => None,
            HeadError::Path { method, .. }
            | HeadError::Host { method, .. }
            | HeadError::TransferCoding { method } => Some(method),
        }
    }

    /// The client's answer, in ESP's JSON: 400 code 3, or for a refused method 405 with the
    /// code ESP derives from 405 (`FAILED_PRECONDITION`, 9: ESP maps an HTTP status it has no
    /// row for by its class, and every other 4xx is 9).
    pub fn esp_error(&self) -> EspError {
        match self {
            HeadError::Method(e @ MethodError::NotAllowed(_)) => EspError::with_status(
                405,
                Code::from_http_status(405),
                e.to_string(),
                Cause::Internal,
            ),
            HeadError::Method(e) => {
                EspError::new(Code::InvalidArgument, e.to_string(), Cause::Internal)
            }
            HeadError::Path { error, .. } => {
                EspError::new(Code::InvalidArgument, error.to_string(), Cause::Internal)
            }
            HeadError::Host { error, .. } => {
                EspError::new(Code::InvalidArgument, error.to_string(), Cause::Internal)
            }
            HeadError::UnderscoreInName { .. } => {
                EspError::new(Code::InvalidArgument, self.to_string(), Cause::Internal)
            }
            e @ HeadError::TransferCoding { .. } => EspError::with_status(
                501,
                Code::from_http_status(501),
                e.to_string(),
                Cause::Internal,
            ),
        }
    }
}

/// The settled head: the method to match and forward, the normalised target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled<'a> {
    pub method: Method,
    pub target: Normalized<'a>,
}

/// Where the request came in: what [`settle`]'s framing checks need besides the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub version: http::Version,
    /// The target is in absolute form (`GET http://host/x HTTP/1.1`), which names the host.
    pub has_authority: bool,
}

/// Steps 1–3 of the module docs on one request head, then the framing rules ([`check_host`],
/// [`transfer_coding_supported`]). The headers are sanitised whatever the outcome (the override
/// is read before it is removed).
pub fn settle<'a>(
    method: &Method,
    framing: Framing,
    headers: &mut HeaderMap,
    target: &'a str,
    opts: HeadOptions,
) -> Result<Settled<'a>, HeadError> {
    // Envoy refuses such a request while parsing its head, before anything else is looked at;
    // the headers are still sanitised below, for the refusal's log and report.
    let refused_name = (opts.refuse_underscores && !opts.underscores_in_headers)
        .then(|| underscore_name(headers).map(|n| n.as_str().to_string()))
        .flatten();
    let method = effective_method(method, headers);
    sanitize_headers(headers, opts.underscores_in_headers);
    if let Some(prefix) = opts.generated_prefix {
        remove_prefixed(headers, prefix.as_bytes());
    }
    if opts.sanitize_client_cert {
        remove_spellings(headers, CLIENT_CERT_HEADER);
    }
    if let Some(name) = refused_name {
        return Err(HeadError::UnderscoreInName { name });
    }
    let method = method?;
    let target = match normalize_target(target, opts.path) {
        Ok(target) => target,
        Err(error) => return Err(HeadError::Path { method, error }),
    };
    if let Err(error) = check_host(framing.version, headers, framing.has_authority) {
        return Err(HeadError::Host { method, error });
    }
    if !transfer_coding_supported(headers) {
        return Err(HeadError::TransferCoding { method });
    }
    Ok(Settled { method, target })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    /// An HTTP/1.1 request in absolute form: its host is named without a Host header.
    const H11: Framing = Framing {
        version: http::Version::HTTP_11,
        has_authority: true,
    };

    const DEFAULT: PathOptions = PathOptions {
        normalize: true,
        merge_slashes: true,
        unescape_slashes: false,
    };

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_target(p, DEFAULT).map(|n| n.text.into_owned())
    }

    fn norm_with(p: &str, opts: PathOptions) -> Result<String, PathError> {
        normalize_target(p, opts).map(|n| n.text.into_owned())
    }

    #[test]
    fn client_copies_of_generated_headers_go_in_every_spelling() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-apigateway-api-userinfo", "forged"),
            ("X_APIGATEWAY_API_OPERATION_NAME", "forged"),
            ("x-apigateway-api-", "forged"),
            ("x-endpoint-api-userinfo", "forged"),
            ("x-apigateway-apis", "kept"),
            ("x-apigateway-other", "kept"),
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        let opts = HeadOptions {
            underscores_in_headers: true,
            generated_prefix: Some("x-apigateway-api-"),
            ..Default::default()
        };
        settle(&Method::GET, H11, &mut h, "/a", opts).unwrap();
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-apigateway-apis", "x-apigateway-other"]);
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/a",
            "/a/b/c",
            "/a/b/",
            "/items/1?q=/../x//y",
            "/a.b/c.",
            "/a/..b/c..d",
        ] {
            let n = normalize_target(p, DEFAULT).unwrap();
            assert!(matches!(n.text, Cow::Borrowed(_)), "{p}");
            assert_eq!(n.text, p);
        }
        // `%` sends a path down the slow path, which still does not allocate when nothing
        // changes.
        let n = normalize_target("/a%20b/c%2Fd", DEFAULT).unwrap();
        assert!(matches!(n.text, Cow::Borrowed(_)));
    }

    #[test]
    fn dot_segments_are_removed() {
        for (input, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/./b", "/a/b"),
            ("/../../a", "/a"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/.", "/"),
            ("/..", "/"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E%2E/b", "/b"),
            ("/a/.%2E/b", "/b"),
            ("/a/%2e./b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/x/../secret?key=1&p=/../", "/secret?key=1&p=/../"),
            ("/a/..\\b", "/b"),
            ("/a\\b\\..\\c", "/a/c"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn repeated_slashes_are_merged_but_a_trailing_one_is_kept() {
        for (input, want) in [
            ("//secret", "/secret"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b//", "/a/b/"),
            ("//", "/"),
            ("/a//..//b", "/b"),
            ("/a?x=//", "/a?x=//"),
            ("//public//1/?q=/../x", "/public/1/?q=/../x"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn ambiguous_encodings_are_refused() {
        use PathError::*;
        for (input, err) in [
            ("/public/..%2Fsecret", EncodedSeparator),
            ("/public/..%2fsecret", EncodedSeparator),
            ("/public/..%5Csecret", EncodedSeparator),
            ("/public/..%5csecret", EncodedSeparator),
            ("/public/%2F..", EncodedSeparator),
            ("/public/x%2F..%2Fy", EncodedSeparator),
            ("/public/%2e%2e%2fsecret", EncodedSeparator),
            ("/public/.%2Fx", EncodedSeparator),
            ("/secret%2F", EncodedSeparator),
            ("/%2Fsecret", EncodedSeparator),
            ("/a%2F%2Fb", EncodedSeparator),
            ("/a%5C%2fb", EncodedSeparator),
            ("/a%2F..;x", EncodedSeparator),
            ("/a%00", EncodedNul),
            ("/a/%00/b", EncodedNul),
            ("/a%%0000", MalformedEscape),
            ("/public/..;/secret", DotSegmentWithParameters),
            ("/public/.;x/secret", DotSegmentWithParameters),
            ("/public/%2E%2e;v=1/secret", DotSegmentWithParameters),
            ("*", NotAbsolutePath),
            ("", NotAbsolutePath),
            ("?q", NotAbsolutePath),
            ("secret", NotAbsolutePath),
        ] {
            assert_eq!(norm(input), Err(err), "{input}");
        }
        // Refusals do not look at the query.
        assert_eq!(norm("/a?b=..%2F%00").as_deref(), Ok("/a?b=..%2F%00"));
    }

    #[test]
    fn plain_encoded_slashes_and_other_escapes_stay() {
        for p in [
            "/objects/a%2Fb",
            "/objects/a%2fb%5Cc",
            "/a%252F..",
            "/a;v=1/b;c",
            "/.hidden",
            "/a%20b%3F%23%3B%C3%A9",
        ] {
            assert_eq!(norm(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn escaped_unreserved_characters_are_decoded() {
        for (input, want) in [
            ("/%73ecret", "/secret"),
            ("/%2e%2ex", "/..x"),
            ("/a%2Eb", "/a.b"),
            ("/%7e%7E%2d%5f%41%30", "/~~-_A0"),
            ("/a%41%2Fb", "/aA%2Fb"),
            ("/%2532", "/%2532"),
            ("/x/%2e%2e/%73ecret?%73=1", "/secret?%73=1"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
        for bad in ["/a%", "/a%2", "/a%zz", "/100%", "/%%32F", "/a%G0"] {
            assert_eq!(norm(bad), Err(PathError::MalformedEscape), "{bad}");
        }
    }

    #[test]
    fn flags_change_the_rules() {
        let raw = PathOptions {
            normalize: false,
            merge_slashes: false,
            unescape_slashes: false,
        };
        for p in [
            "/x/../secret",
            "//secret",
            "/public/..%2Fsecret",
            "/a\\..\\b",
            "/..;/x",
        ] {
            assert_eq!(norm_with(p, raw).as_deref(), Ok(p), "{p}");
        }
        assert_eq!(norm_with("/a%00", raw), Err(PathError::EncodedNul));
        assert_eq!(norm_with("/a%%00", raw), Err(PathError::EncodedNul));
        assert_eq!(norm_with("/100%/%73", raw).as_deref(), Ok("/100%/%73"));
        let no_merge = PathOptions {
            merge_slashes: false,
            ..DEFAULT
        };
        assert_eq!(norm_with("//a//b/../c", no_merge).as_deref(), Ok("//a//c"));
        assert_eq!(norm_with("/..//a", no_merge).as_deref(), Ok("//a"));
        let merge_only = PathOptions {
            normalize: false,
            ..DEFAULT
        };
        assert_eq!(norm_with("//a/./b", merge_only).as_deref(), Ok("/a/./b"));
        let unescape = PathOptions {
            unescape_slashes: true,
            ..DEFAULT
        };
        let n = normalize_target("/public/..%2Fsecret?a=%2F", unescape).unwrap();
        assert_eq!(
            (n.text.as_ref(), n.unescaped_slashes),
            ("/secret?a=%2F", true)
        );
        let n = normalize_target("/a%5cb%2F", unescape).unwrap();
        assert_eq!((n.text.as_ref(), n.unescaped_slashes), ("/a/b/", true));
        let n = normalize_target("/a/../b", unescape).unwrap();
        assert_eq!((n.text.as_ref(), n.unescaped_slashes), ("/b", false));
        assert_eq!(norm_with("/a%252Fb", unescape).as_deref(), Ok("/a%252Fb"));
    }

    #[test]
    fn segment_parameters_are_stripped_for_the_second_lookup() {
        assert_eq!(without_segment_parameters("/a;x/b;v=1"), "/a/b");
        assert_eq!(without_segment_parameters("/secret;"), "/secret");
        assert_eq!(without_segment_parameters("/;/x"), "//x");
        assert!(matches!(
            without_segment_parameters("/a/b"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn parameters_on_an_empty_segment_are_refused() {
        for p in [
            "/;x/items/1",
            "/items/;x/1",
            "/;/secret",
            "/;",
            "/a/;",
            "/a//;x",
            "/a\\;x/b",
        ] {
            let o = PathOptions {
                unescape_slashes: true,
                ..PathOptions::default()
            };
            assert_eq!(norm(p), Err(PathError::EmptySegmentWithParameters), "{p}");
            assert_eq!(
                norm_with(p, o),
                Err(PathError::EmptySegmentWithParameters),
                "{p}"
            );
        }
        // Behind an encoded slash: one more empty segment to a backend that decodes it.
        assert_eq!(norm("/a%2F;x"), Err(PathError::EncodedSeparator));
        assert_eq!(norm("/a%2F;x%2Fb"), Err(PathError::EncodedSeparator));
        let unescaping = PathOptions {
            unescape_slashes: true,
            ..PathOptions::default()
        };
        assert_eq!(
            norm_with("/a%2F;x", unescaping),
            Err(PathError::EmptySegmentWithParameters)
        );
        // Without normalisation they are forwarded as sent (the operator's choice).
        let off = PathOptions {
            normalize: false,
            merge_slashes: false,
            unescape_slashes: false,
        };
        assert_eq!(norm_with("/;x/a", off).as_deref(), Ok("/;x/a"));
        // Parameters on a named segment are left to the pipeline's second lookup.
        assert_eq!(norm("/a;x/b;").as_deref(), Ok("/a;x/b;"));
        assert!(matches!(
            normalize_path("/a;x/b", PathOptions::default()).map(|n| n.text),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn the_servlet_path_is_stripped_then_merged_and_resolved() {
        assert_eq!(servlet_path("/items;x//1").as_deref(), Some("/items/1"));
        assert_eq!(servlet_path("//secret;x").as_deref(), Some("/secret"));
        assert_eq!(servlet_path("/a;x/./b;y/").as_deref(), Some("/a/b/"));
        assert_eq!(servlet_path("/;x/items/1").as_deref(), Some("/items/1"));
        assert_eq!(servlet_path("/a;x/%2e%2e/b").as_deref(), Some("/b"));
        assert_eq!(servlet_path("/a;x/b%").as_deref(), None);
        assert!(matches!(servlet_path("/a/b"), Some(Cow::Borrowed("/a/b"))));
    }

    #[test]
    fn redirect_targets_stay_on_this_host() {
        for (t, want) in [
            ("//evil.com", "/evil.com"),
            ("///evil.com", "/evil.com"),
            ("/\\evil.example/path", "/evil.example/path"),
            ("/\\/\\evil", "/evil"),
            ("//", "/"),
            ("\\evil", "/evil"),
        ] {
            assert_eq!(redirect_target(t), want, "{t:?}");
        }
        assert!(matches!(
            redirect_target("/a//b?c=//d"),
            Cow::Borrowed("/a//b?c=//d")
        ));
        assert!(matches!(redirect_target("/"), Cow::Borrowed("/")));
    }

    #[test]
    fn target_override_headers_are_proxy_owned() {
        for n in [
            "x-original-url",
            "X-Original-URL",
            "X_ORIGINAL_URL",
            "x-rewrite-url",
            "X_Rewrite_Url",
        ] {
            assert!(is_proxy_owned(n.as_bytes()), "{n}");
            assert!(is_dropped(n.as_bytes(), true), "{n}");
        }
        assert!(!is_proxy_owned(b"x-original-urls"));
        assert!(!is_proxy_owned(b"x-original"));
    }

    #[test]
    fn host_rules() {
        use http::Version;
        let one = hm(&[("host", "a")]);
        let two = hm(&[("host", "a"), ("host", "a")]);
        let none = HeaderMap::new();
        assert_eq!(check_host(Version::HTTP_11, &one, false), Ok(()));
        for v in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(
                check_host(v, &two, false),
                Err(HostError::Repeated),
                "{v:?}"
            );
            assert_eq!(check_host(v, &two, true), Err(HostError::Repeated), "{v:?}");
        }
        assert_eq!(
            check_host(Version::HTTP_11, &none, false),
            Err(HostError::Missing)
        );
        assert_eq!(check_host(Version::HTTP_11, &none, true), Ok(()));
        assert_eq!(check_host(Version::HTTP_10, &none, false), Ok(()));
        assert_eq!(check_host(Version::HTTP_2, &none, false), Ok(()));
    }

    #[test]
    fn only_a_lone_chunked_coding_is_supported() {
        assert!(transfer_coding_supported(&HeaderMap::new()));
        for te in ["chunked", "Chunked", " CHUNKED "] {
            assert!(
                transfer_coding_supported(&hm(&[("transfer-encoding", te)])),
                "{te}"
            );
        }
        for te in [
            "gzip, chunked",
            "chunked, chunked",
            "chunked,",
            ",chunked",
            "gzip",
            "",
        ] {
            assert!(
                !transfer_coding_supported(&hm(&[("transfer-encoding", te)])),
                "{te:?}"
            );
        }
        assert!(!transfer_coding_supported(&hm(&[
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ])));
    }

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn methods_must_be_upper_case_tokens() {
        let h = HeaderMap::new();
        for ok in ["GET", "DELETE", "M-SEARCH", "VERSION_CONTROL", "PROPFIND"] {
            let m = Method::from_bytes(ok.as_bytes()).unwrap();
            assert_eq!(effective_method(&m, &h), Ok(m.clone()), "{ok}");
        }
        for bad in ["get", "Get", "dElete", "DEL3TE", "GET!"] {
            let m = Method::from_bytes(bad.as_bytes()).unwrap();
            assert_eq!(
                effective_method(&m, &h),
                Err(MethodError::NotUpperCaseToken),
                "{bad}"
            );
        }
        assert_eq!(
            effective_method(&Method::CONNECT, &h),
            Err(MethodError::NotAllowed(Method::CONNECT))
        );
        assert_eq!(
            effective_method(&Method::TRACE, &h),
            Err(MethodError::NotAllowed(Method::TRACE))
        );
    }

    #[test]
    fn the_override_is_the_method() {
        let h = hm(&[("x-http-method-override", "DELETE")]);
        assert_eq!(effective_method(&Method::GET, &h), Ok(Method::DELETE));
        for (v, err) in [
            ("delete", MethodError::BadOverride),
            ("GET, DELETE", MethodError::BadOverride),
            ("", MethodError::BadOverride),
            ("CONNECT", MethodError::NotAllowed(Method::CONNECT)),
            ("TRACE", MethodError::NotAllowed(Method::TRACE)),
        ] {
            let h = hm(&[("x-http-method-override", v)]);
            assert_eq!(effective_method(&Method::POST, &h), Err(err), "{v:?}");
        }
        let h = hm(&[
            ("x-http-method-override", "GET"),
            ("x-http-method-override", "GET"),
        ]);
        assert_eq!(
            effective_method(&Method::POST, &h),
            Err(MethodError::RepeatedOverride)
        );
        // A bad request method is refused even with a good override.
        let h = hm(&[("x-http-method-override", "GET")]);
        let lower = Method::from_bytes(b"post").unwrap();
        assert_eq!(
            effective_method(&lower, &h),
            Err(MethodError::NotUpperCaseToken)
        );
    }

    #[test]
    fn header_sanitising() {
        let mut h = hm(&[
            ("x_endpoint_api_userinfo", "forged"),
            ("x-endpoint-api-userinfo", "forged"),
            ("x-endpoint_api-project_id", "1"),
            ("x-endpoint-api-anything", "1"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x_real_ip", "6.6.6.6"),
            ("x-http-method-override", "GET"),
            ("x_http_method", "GET"),
            ("x-method-override", "GET"),
            ("x_custom", "1"),
            ("x-plain", "1"),
            ("host", "h"),
        ]);
        let mut kept = h.clone();
        assert_eq!(sanitize_headers(&mut h, false), 10);
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["host", "x-forwarded-for", "x-plain"]);
        // --underscores_in_headers keeps other names with `_`, never the proxy's own.
        assert_eq!(sanitize_headers(&mut kept, true), 9);
        let mut names: Vec<&str> = kept.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            vec!["host", "x-forwarded-for", "x-plain", "x_custom"]
        );
        // Every value of a repeated name goes.
        let mut h = hm(&[
            ("x-endpoint-api-userinfo", "a"),
            ("x-endpoint-api-userinfo", "b"),
        ]);
        sanitize_headers(&mut h, true);
        assert!(h.is_empty());
    }

    #[test]
    fn proxy_owned_names_in_any_case() {
        assert!(is_proxy_owned(b"X-ENDPOINT-API-USERINFO"));
        assert!(is_proxy_owned(b"X_Endpoint_Api_Project_Id"));
        assert!(is_proxy_owned(b"X_HTTP_METHOD_OVERRIDE"));
        assert!(is_proxy_owned(b"X_Real_IP"));
        assert!(!is_proxy_owned(b"X-Real-IP"));
        assert!(!is_proxy_owned(b"x-endpoint-api"));
        assert!(!is_proxy_owned(b"x-forwarded-for-x"));
        assert!(!is_proxy_owned(b""));
    }

    #[test]
    fn settle_reports_the_method_of_a_refused_path_and_sanitises_anyway() {
        let mut h = hm(&[
            ("x-http-method-override", "DELETE"),
            ("x_endpoint_api_userinfo", "forged"),
        ]);
        let e = settle(&Method::GET, H11, &mut h, "/a%00", HeadOptions::default()).unwrap_err();
        assert_eq!(e.method(), Some(&Method::DELETE));
        assert_eq!(e.esp_error().http_status, 400);
        assert!(h.is_empty());
        let mut h = hm(&[("x-http-method-override", "CONNECT")]);
        let e = settle(&Method::GET, H11, &mut h, "/", HeadOptions::default()).unwrap_err();
        let esp = e.esp_error();
        assert_eq!((esp.http_status, esp.code), (405, 9));
        let mut h = HeaderMap::new();
        let s = settle(
            &Method::GET,
            H11,
            &mut h,
            "//a/./b?c",
            HeadOptions::default(),
        )
        .unwrap();
        assert_eq!((s.method, s.target.text.as_ref()), (Method::GET, "/a/b?c"));
    }

    #[test]
    fn settle_applies_the_framing_rules_after_the_path() {
        let origin_form = Framing {
            has_authority: false,
            ..H11
        };
        let opts = HeadOptions::default();
        let e = settle(&Method::PUT, origin_form, &mut HeaderMap::new(), "/a", opts).unwrap_err();
        assert_eq!(
            e,
            HeadError::Host {
                method: Method::PUT,
                error: HostError::Missing
            }
        );
        let mut h = hm(&[("host", "a"), ("host", "b")]);
        let e = settle(&Method::GET, H11, &mut h, "/a", opts).unwrap_err();
        assert!(
            matches!(
                e,
                HeadError::Host {
                    error: HostError::Repeated,
                    ..
                }
            ),
            "{e:?}"
        );
        let mut h = hm(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]);
        let e = settle(&Method::POST, origin_form, &mut h, "/a", opts).unwrap_err();
        assert_eq!(
            e,
            HeadError::TransferCoding {
                method: Method::POST
            }
        );
        // A refused path is reported before the framing.
        let e = settle(
            &Method::GET,
            origin_form,
            &mut HeaderMap::new(),
            "/%00",
            opts,
        );
        assert!(matches!(e, Err(HeadError::Path { .. })), "{e:?}");
        let mut h = hm(&[("host", "a"), ("transfer-encoding", "Chunked")]);
        assert!(settle(&Method::POST, origin_form, &mut h, "/a", opts).is_ok());
    }

    fn opts_strategy() -> impl Strategy<Value = PathOptions> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(n, m, u)| PathOptions {
            normalize: n,
            merge_slashes: m,
            unescape_slashes: u,
        })
    }

    /// Paths built from the pieces that matter, so the interesting cases are common.
    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/"),
            Just("."),
            Just(".."),
            Just("%2e"),
            Just("%2E"),
            Just("%2F"),
            Just("%2f"),
            Just("%5C"),
            Just("\\"),
            Just(";"),
            Just("%00"),
            Just("%"),
            Just("%41"),
            Just("%7e"),
            Just("%32"),
            Just("%25"),
            Just("a"),
            Just("b"),
            Just("?"),
            Just("é"),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest! {
        #[test]
        fn never_panics_on_any_string(s in ".*", o in opts_strategy()) {
            let _ = normalize_target(&s, o);
            let _ = without_segment_parameters(&s);
            let _ = servlet_path(&s);
            let r = redirect_target(&s);
            prop_assert!(r.starts_with('/'));
            prop_assert!(!r.starts_with("//") && !r.starts_with("/\\"));
        }

        #[test]
        fn idempotent_and_clean(p in path_strategy(), o in opts_strategy()) {
            if let Ok(n) = normalize_target(&p, o) {
                let once = n.text.into_owned();
                let again = normalize_target(&once, o).expect("a normalised path is accepted");
                prop_assert_eq!(again.text.as_ref(), once.as_str());
                prop_assert!(!again.unescaped_slashes);
                let path = path_of(&once);
                prop_assert!(path.starts_with('/'));
                if o.merge_slashes {
                    prop_assert!(!path.contains("//"), "{}", once);
                }
                if o.normalize {
                    prop_assert!(!path.contains('\\'), "{}", once);
                    prop_assert!(!scan_escapes(path.as_bytes(), true).unwrap_or(true), "{}", once);
                    for seg in path.split('/') {
                        prop_assert!(dots(seg).is_none(), "{}", once);
                        prop_assert!(!seg.starts_with(';'), "{}", once);
                    }
                }
                // The query is never touched.
                prop_assert_eq!(&once[path.len()..], &p[path_of(&p).len()..]);
            }
        }

        #[test]
        fn an_unchanged_path_is_borrowed(p in path_strategy(), o in opts_strategy()) {
            if let Ok(n) = normalize_target(&p, o) {
                if n.text == p.as_str() {
                    prop_assert!(matches!(n.text, Cow::Borrowed(_)));
                }
            }
        }
    }
}
