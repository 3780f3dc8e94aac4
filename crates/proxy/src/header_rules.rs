//! Headers the operator adds: ESPv2's `--add_request_header`, `--append_request_header`,
//! `--add_response_header` and `--append_response_header` (`KEY=VALUE`, repeatable), which its
//! config generator turns into the route table's `request_headers_to_add` /
//! `response_headers_to_add`.
//!
//! - **Where they apply.** Request rules apply to the request sent to the backend, last, after
//!   everything the proxy itself sets (`X-Forwarded-For`, `X-Endpoint-API-UserInfo`, a backend ID
//!   token), as Envoy's router applies them. Response rules apply to every response the proxy
//!   sends to the client, its own answers included (errors, health checks, preflights): Envoy
//!   applies them to backend responses and its direct-response routes, but not to the local
//!   replies of its filters (envoyproxy/envoy#8944, still open), so an ESPv2 `401 Jwt is
//!   missing` lacks them. An operator adding `X-Content-Type-Options` or a cache policy means
//!   every response. They go after CORS and HSTS, before compression decides (so a
//!   `cache-control: no-transform` added here keeps a response uncompressed).
//! - **Add and append.** `add` replaces every value the header has; `append` adds one more
//!   field line. Rules run in order: every add, then every append (ESPv2's order), each on the
//!   headers as the previous rule left them.
//! - **Values.** Text with Envoy's variables ([`Var`]); `%%` is a literal `%`. A value that
//!   renders empty adds nothing (Envoy's `keep_empty_value: false`), so an add with an empty
//!   value does not remove the header either. `KEY=VALUE` splits at the first `=`, so a value
//!   may hold `=` (ESPv2 refuses it) and `;` (ESPv2 splits there).
//! - **Refused at start**, with a sentence naming the flag: no `=`, an empty or invalid name,
//!   the framing headers (`host`, `content-length`, `transfer-encoding`, `connection`, ...;
//!   Envoy refuses `host` and pseudo-headers, and changing framing would desynchronise the
//!   connection), a value with control characters, a `%` that starts no variable, an unknown
//!   variable, a known Envoy variable Portico does not have, and a response-only variable in a
//!   request rule.
//!
//! A leaf module: it reads only `http` and the standard library.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::SystemTime;

/// Which message a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request to the backend.
    Request,
    /// The response to the client.
    Response,
}

/// One `--add_*_header`/`--append_*_header` value, parsed.
#[derive(Debug, Clone)]
pub struct HeaderRule {
    pub name: HeaderName,
    /// `true`: another field line (`--append_*`); `false`: replaces every value (`--add_*`).
    pub append: bool,
    value: Vec<Part>,
    /// The value when it has no variable: built once, cloned per message without allocating.
    fixed: Option<HeaderValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// How much of an address: `%DOWNSTREAM_X_ADDRESS%`, `..._ADDRESS_WITHOUT_PORT%`, `%DOWNSTREAM_X_PORT%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrForm {
    WithPort,
    WithoutPort,
    Port,
}

/// The Envoy variables Portico renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// `%DOWNSTREAM_REMOTE_ADDRESS%` (`_ADDRESS_WITHOUT_PORT`, `%DOWNSTREAM_REMOTE_PORT%`): the client as the proxy
    /// believes it (after `X-Forwarded-For`); port 0 when the address came from that header,
    /// as in Envoy.
    ClientAddress(AddrForm),
    /// `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%` (and variants): the TCP peer.
    PeerAddress(AddrForm),
    /// `%DOWNSTREAM_LOCAL_ADDRESS%` (and variants): the address the connection was accepted on.
    LocalAddress(AddrForm),
    /// `%PROTOCOL%`: `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    Protocol,
    /// `%HOSTNAME%`: the machine's host name, read once at start.
    Hostname(String),
    /// `%START_TIME%`: when the request arrived, `2006-01-02T15:04:05.000Z` (Envoy's default
    /// format; a format argument is refused).
    StartTime,
    /// `%REQ(name?alternative):max%`: the request header's first value.
    Request(HeaderRef),
    /// `%RESP(name?alternative):max%`: the response header's first value (response rules).
    Response(HeaderRef),
    /// `%RESPONSE_CODE%`: the response status (response rules).
    ResponseCode,
}

/// A header named by `%REQ(...)%`/`%RESP(...)%`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRef {
    pub name: HeaderName,
    pub alternative: Option<HeaderName>,
    /// `:N`: at most N bytes of the value.
    pub max_len: Option<usize>,
}

/// Variables of Envoy's header formatter that Portico has no equivalent for: named so the
/// refusal says "not supported" rather than "unknown".
const ENVOY_ONLY: &[&str] = &[
    "DOWNSTREAM_LOCAL_URI_SAN",
    "DOWNSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_LOCAL_SUBJECT",
    "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_TLS_SESSION_ID",
    "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_VERSION",
    "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_FINGERPRINT_1",
    "DOWNSTREAM_PEER_SERIAL",
    "DOWNSTREAM_PEER_CERT",
    "DOWNSTREAM_PEER_CERT_V_START",
    "DOWNSTREAM_PEER_CERT_V_END",
    "DOWNSTREAM_LOCAL_DNS_SAN",
    "DOWNSTREAM_PEER_DNS_SAN",
    "REQUESTED_SERVER_NAME",
    "UPSTREAM_METADATA",
    "UPSTREAM_REMOTE_ADDRESS",
    "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_HOST",
    "UPSTREAM_CLUSTER",
    "DYNAMIC_METADATA",
    "CLUSTER_METADATA",
    "FILTER_STATE",
    "PER_REQUEST_STATE",
    "RESPONSE_FLAGS",
    "RESPONSE_CODE_DETAILS",
    "ROUTE_NAME",
    "VIRTUAL_CLUSTER_NAME",
    "ENVIRONMENT",
    "TRAILER",
    "RESP_TRAILER",
    "CONNECTION_ID",
    "STREAM_ID",
    "REQUEST_DURATION",
    "RESPONSE_DURATION",
    "DURATION",
    "BYTES_RECEIVED",
    "BYTES_SENT",
];

/// Headers no rule may set: the request's target (`host`; pseudo-headers are not header names
/// at all) and the message framing, which the proxy owns on both sides.
const REFUSED_NAMES: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
];

/// Why a rule was refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderRuleError {
    #[error("expected KEY=VALUE")]
    NoEquals,
    #[error("the header name is empty")]
    EmptyName,
    #[error("{0:?} is not a valid header name")]
    BadName(String),
    #[error("the {0} header cannot be set: the proxy owns it")]
    RefusedName(String),
    #[error("the value holds a character not allowed in a header value (a control character)")]
    BadValue,
    #[error(
        "the '%' at byte {0} of the value starts no variable; write %% for a literal '%' \
         (variables look like %PROTOCOL% or %REQ(x-name)%)"
    )]
    LonePercent(usize),
    #[error("%{0}% is not an Envoy header variable")]
    Unknown(String),
    #[error("%{0}% is an Envoy header variable that Portico does not support")]
    Unsupported(String),
    #[error("%{0}% describes the response: it can only be used in --add_response_header and --append_response_header")]
    ResponseOnly(String),
    #[error("%{0}% takes no argument")]
    NoArgument(String),
    #[error(
        "%START_TIME% with a format is not supported: use %START_TIME% (2006-01-02T15:04:05.000Z)"
    )]
    StartTimeFormat,
    #[error("%{0}(...)% needs a header name, e.g. %{0}(x-request-id)%")]
    NeedsHeader(String),
    #[error("%{var}({arg})%: {arg:?} is not a header name Portico can read (pseudo-headers other than :authority are not)")]
    BadHeaderArgument { var: String, arg: String },
    #[error("%{0}%: a maximum length (:N) is only allowed on %REQ(...)% and %RESP(...)%")]
    NoMaxLength(String),
    #[error("%{0}%: the maximum length after ':' must be a positive integer")]
    BadMaxLength(String),
}

impl HeaderRule {
    /// Parses one flag value (`KEY=VALUE`) for `side`; `append` for the `--append_*` flags.
    pub fn parse(arg: &str, side: Side, append: bool) -> Result<HeaderRule, HeaderRuleError> {
        let (key, value) = arg.split_once('=').ok_or(HeaderRuleError::NoEquals)?;
        if key.is_empty() {
            return Err(HeaderRuleError::EmptyName);
        }
        let name = HeaderName::from_bytes(key.as_bytes())
            .map_err(|_| HeaderRuleError::BadName(key.to_string()))?;
        if REFUSED_NAMES.contains(&name.as_str()) {
            return Err(HeaderRuleError::RefusedName(name.as_str().to_string()));
        }
        let value = parse_value(value, side)?;
        let fixed = match value.as_slice() {
            [Part::Text(t)] if !t.is_empty() => {
                Some(HeaderValue::from_str(t).map_err(|_| HeaderRuleError::BadValue)?)
            }
            _ => None,
        };
        Ok(HeaderRule {
            name,
            append,
            value,
            fixed,
        })
    }

    /// The variables this rule's value reads.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.value.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Text(_) => None,
        })
    }

    /// The value for one message; `None` when it renders empty or is not a valid header value
    /// (a `%REQ()%` copy cannot make it invalid, but nothing here panics on one).
    fn render(
        &self,
        facts: &Facts,
        request: &HeaderMap,
        response: Option<(StatusCode, &HeaderMap)>,
    ) -> Option<HeaderValue> {
        if let Some(v) = &self.fixed {
            return Some(v.clone());
        }
        let mut out: Vec<u8> = Vec::new();
        for part in &self.value {
            match part {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Var(v) => render_var(v, facts, request, response, &mut out),
            }
        }
        if out.is_empty() {
            return None;
        }
        HeaderValue::from_bytes(&out).ok()
    }
}

fn parse_value(v: &str, side: Side) -> Result<Vec<Part>, HeaderRuleError> {
    let b = v.as_bytes();
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'%' {
            // Tab and visible characters, and UTF-8 beyond ASCII (obs-text on the wire).
            if c != b'\t' && (c < 0x20 || c == 0x7f) {
                return Err(HeaderRuleError::BadValue);
            }
            let next = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(b.len(), |p| i + p);
            text.push_str(&v[i..next]);
            i = next;
            continue;
        }
        if b.get(i + 1) == Some(&b'%') {
            text.push('%');
            i += 2;
            continue;
        }
        let (var, end) = parse_var(v, i, side)?;
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(Part::Var(var));
        i = end;
    }
    if !text.is_empty() || parts.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// One `%COMMAND(arg):N%` starting at byte `at` (a `%`); the variable and the byte after it.
fn parse_var(v: &str, at: usize, side: Side) -> Result<(Var, usize), HeaderRuleError> {
    let b = v.as_bytes();
    let lone = || HeaderRuleError::LonePercent(at);
    let mut i = at + 1;
    let start = i;
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let command = &v[start..i];
    if command.is_empty() {
        return Err(lone());
    }
    let mut arg = None;
    if b.get(i) == Some(&b'(') {
        let close = b[i..].iter().position(|&c| c == b')').ok_or_else(lone)? + i;
        arg = Some(&v[i + 1..close]);
        i = close + 1;
    }
    let mut max_len = None;
    if b.get(i) == Some(&b':') {
        let s = i + 1;
        let mut e = s;
        while e < b.len() && b[e].is_ascii_digit() {
            e += 1;
        }
        let n: usize = v[s..e]
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| HeaderRuleError::BadMaxLength(command.to_string()))?;
        max_len = Some(n);
        i = e;
    }
    if b.get(i) != Some(&b'%') {
        return Err(lone());
    }
    let end = i + 1;
    let no_arg = |var: Var| -> Result<Var, HeaderRuleError> {
        if arg.is_some() {
            return Err(HeaderRuleError::NoArgument(command.to_string()));
        }
        if max_len.is_some() {
            return Err(HeaderRuleError::NoMaxLength(command.to_string()));
        }
        Ok(var)
    };
    // Envoy's names: `DOWNSTREAM_X_ADDRESS`, `..._ADDRESS_WITHOUT_PORT` and `DOWNSTREAM_X_PORT`.
    let addr = |x: &str| -> Option<AddrForm> {
        let rest = command.strip_prefix("DOWNSTREAM_")?.strip_prefix(x)?;
        match rest {
            "_ADDRESS" => Some(AddrForm::WithPort),
            "_ADDRESS_WITHOUT_PORT" => Some(AddrForm::WithoutPort),
            "_PORT" => Some(AddrForm::Port),
            _ => None,
        }
    };
    let var = if let Some(f) = addr("REMOTE") {
        no_arg(Var::ClientAddress(f))?
    } else if let Some(f) = addr("DIRECT_REMOTE") {
        no_arg(Var::PeerAddress(f))?
    } else if let Some(f) = addr("LOCAL") {
        no_arg(Var::LocalAddress(f))?
    } else {
        match command {
            "PROTOCOL" => no_arg(Var::Protocol)?,
            "HOSTNAME" => no_arg(Var::Hostname(hostname()))?,
            "START_TIME" if arg.is_some() => return Err(HeaderRuleError::StartTimeFormat),
            "START_TIME" => no_arg(Var::StartTime)?,
            "REQ" | "RESP" => {
                if command == "RESP" && side == Side::Request {
                    return Err(HeaderRuleError::ResponseOnly(command.to_string()));
                }
                let r = header_ref(command, arg, max_len)?;
                if command == "REQ" {
                    Var::Request(r)
                } else {
                    Var::Response(r)
                }
            }
            "RESPONSE_CODE" if side == Side::Request => {
                return Err(HeaderRuleError::ResponseOnly(command.to_string()))
            }
            "RESPONSE_CODE" => no_arg(Var::ResponseCode)?,
            c if ENVOY_ONLY.contains(&c) => {
                return Err(HeaderRuleError::Unsupported(c.to_string()))
            }
            c => return Err(HeaderRuleError::Unknown(c.to_string())),
        }
    };
    Ok((var, end))
}

fn header_ref(
    var: &str,
    arg: Option<&str>,
    max_len: Option<usize>,
) -> Result<HeaderRef, HeaderRuleError> {
    let arg = arg
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| HeaderRuleError::NeedsHeader(var.to_string()))?;
    let one = |s: &str| -> Result<HeaderName, HeaderRuleError> {
        let s = s.trim();
        // Envoy's :authority is the Host header on HTTP/1.1 and what hyper folds into it.
        let s = if s.eq_ignore_ascii_case(":authority") {
            "host"
        } else {
            s
        };
        HeaderName::from_bytes(s.as_bytes()).map_err(|_| HeaderRuleError::BadHeaderArgument {
            var: var.to_string(),
            arg: arg.to_string(),
        })
    };
    let (name, alternative) = match arg.split_once('?') {
        Some((a, b)) => (one(a)?, Some(one(b)?)),
        None => (one(arg)?, None),
    };
    Ok(HeaderRef {
        name,
        alternative,
        max_len,
    })
}

/// The machine's host name, as `gethostname` gives it (Linux's procfs copy of it).
pub fn machine_hostname() -> String {
    hostname()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// What rules read about one request's connection and timing (its headers are passed apart).
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// The client as the proxy believes it; `port` 0 when it came from `X-Forwarded-For`.
    pub client: SocketAddr,
    pub peer: SocketAddr,
    /// `None` when the listener did not record it (nothing asked for it).
    pub local: Option<SocketAddr>,
    pub version: Version,
    pub start: SystemTime,
}

fn render_var(
    v: &Var,
    f: &Facts,
    request: &HeaderMap,
    resp: Option<(StatusCode, &HeaderMap)>,
    out: &mut Vec<u8>,
) {
    let mut s = String::new();
    match v {
        Var::ClientAddress(form) => addr(&mut s, Some(f.client), *form),
        Var::PeerAddress(form) => addr(&mut s, Some(f.peer), *form),
        Var::LocalAddress(form) => addr(&mut s, f.local, *form),
        Var::Protocol => s.push_str(match f.version {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        }),
        Var::Hostname(h) => s.push_str(h),
        Var::StartTime => start_time(&mut s, f.start),
        Var::Request(r) => return copy_header(r, request, out),
        Var::Response(r) => {
            if let Some((_, h)) = resp {
                copy_header(r, h, out);
            }
            return;
        }
        Var::ResponseCode => {
            if let Some((status, _)) = resp {
                s.push_str(status.as_str());
            }
        }
    }
    out.extend_from_slice(s.as_bytes());
}

fn addr(s: &mut String, a: Option<SocketAddr>, form: AddrForm) {
    let Some(a) = a else { return };
    let _ = match form {
        AddrForm::WithPort => write!(s, "{a}"),
        AddrForm::WithoutPort => write!(s, "{}", a.ip()),
        AddrForm::Port => write!(s, "{}", a.port()),
    };
}

fn start_time(s: &mut String, t: SystemTime) {
    let t = time::OffsetDateTime::from(t);
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

fn copy_header(r: &HeaderRef, h: &HeaderMap, out: &mut Vec<u8>) {
    let v = h
        .get(&r.name)
        .or_else(|| r.alternative.as_ref().and_then(|a| h.get(a)));
    if let Some(v) = v {
        let b = v.as_bytes();
        let n = r.max_len.map_or(b.len(), |m| m.min(b.len()));
        out.extend_from_slice(&b[..n]);
    }
}

fn set(headers: &mut HeaderMap, rule: &HeaderRule, value: HeaderValue) {
    if rule.append {
        headers.append(rule.name.clone(), value);
    } else {
        headers.insert(rule.name.clone(), value);
    }
}

/// Applies request rules, in order, to the request going to the backend; `%REQ(...)%` reads
/// `headers` as the previous rules left them.
pub fn apply_to_request(rules: &[HeaderRule], headers: &mut HeaderMap, facts: &Facts) {
    for rule in rules {
        if let Some(v) = rule.render(facts, headers, None) {
            set(headers, rule, v);
        }
    }
}

/// Applies response rules, in order, to a response going to the client; `request` holds the
/// client's request headers the rules read ([`request_headers_read`]).
pub fn apply_to_response(
    rules: &[HeaderRule],
    status: StatusCode,
    headers: &mut HeaderMap,
    request: &HeaderMap,
    facts: &Facts,
) {
    for rule in rules {
        if let Some(v) = rule.render(facts, request, Some((status, headers))) {
            set(headers, rule, v);
        }
    }
}

/// The request headers response rules read (`%REQ(...)%`), kept from the client's request
/// until its response: only these are copied.
pub fn request_headers_read(rules: &[HeaderRule]) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = Vec::new();
    for r in rules {
        for v in r.vars() {
            if let Var::Request(h) = v {
                for n in std::iter::once(&h.name).chain(h.alternative.as_ref()) {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
        }
    }
    names
}

/// Whether any rule reads the local address (the listener then records it per connection).
pub fn reads_local_address(rules: &[HeaderRule]) -> bool {
    rules
        .iter()
        .any(|r| r.vars().any(|v| matches!(v, Var::LocalAddress(_))))
}

/// Splits the config manager's list form (`--add_request_headers=k1=v1;k2=v2`) into flag
/// values, skipping empty entries as ESPv2 does.
pub fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(';').filter(|s| !s.is_empty())
}

/// ESPv2's four header flags, each value one `KEY=VALUE` as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Espv2HeaderFlags {
    pub add_request_header: Vec<String>,
    pub append_request_header: Vec<String>,
    pub add_response_header: Vec<String>,
    pub append_response_header: Vec<String>,
}

/// [`Espv2HeaderFlags`] to the two rule lists (request, response), in ESPv2's order (adds, then
/// appends); the error names the flag and its value.
pub fn from_espv2_flags(
    f: &Espv2HeaderFlags,
) -> Result<(Vec<HeaderRule>, Vec<HeaderRule>), String> {
    let one = |flag: &str, values: &[String], side: Side, append: bool| {
        values
            .iter()
            .map(|v| {
                HeaderRule::parse(v, side, append)
                    .map_err(|e| format!("invalid --{flag} {v:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let mut request = one(
        "add_request_header",
        &f.add_request_header,
        Side::Request,
        false,
    )?;
    request.extend(one(
        "append_request_header",
        &f.append_request_header,
        Side::Request,
        true,
    )?);
    let mut response = one(
        "add_response_header",
        &f.add_response_header,
        Side::Response,
        false,
    )?;
    response.extend(one(
        "append_response_header",
        &f.append_response_header,
        Side::Response,
        true,
    )?);
    Ok((request, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            client: "203.0.113.7:0".parse().unwrap(),
            peer: "10.0.0.2:41000".parse().unwrap(),
            local: Some("10.0.0.9:8080".parse().unwrap()),
            version: Version::HTTP_11,
            start: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
        }
    }

    fn req(arg: &str) -> Result<HeaderRule, HeaderRuleError> {
        HeaderRule::parse(arg, Side::Request, false)
    }

    fn render_req(arg: &str, h: &HeaderMap) -> Option<String> {
        req(arg)
            .unwrap()
            .render(&facts(), h, None)
            .map(|v| String::from_utf8(v.as_bytes().to_vec()).unwrap())
    }

    #[test]
    fn variables_render() {
        let mut h = HeaderMap::new();
        h.insert("x-id", HeaderValue::from_static("abcdef"));
        h.insert("host", HeaderValue::from_static("api.example"));
        let cases = [
            ("k=%DOWNSTREAM_REMOTE_ADDRESS%", "203.0.113.7:0"),
            ("k=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "203.0.113.7"),
            ("k=%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "10.0.0.2:41000"),
            ("k=%DOWNSTREAM_DIRECT_REMOTE_PORT%", "41000"),
            ("k=%DOWNSTREAM_REMOTE_PORT%", "0"),
            ("k=%DOWNSTREAM_LOCAL_PORT%", "8080"),
            ("k=%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.0.0.9"),
            ("k=%PROTOCOL%", "HTTP/1.1"),
            ("k=%START_TIME%", "2023-11-14T22:13:20.123Z"),
            (
                "k=id %REQ(x-id)% via %REQ(:authority)%",
                "id abcdef via api.example",
            ),
            ("k=%REQ(X-ID):3%", "abc"),
            ("k=%REQ(x-none?x-id)%", "abcdef"),
            ("k=100%% sure", "100% sure"),
            ("k=a=b;c", "a=b;c"),
        ];
        for (arg, want) in cases {
            assert_eq!(render_req(arg, &h).as_deref(), Some(want), "{arg}");
        }
        // Empty renders add nothing.
        assert_eq!(render_req("k=", &h), None);
        assert_eq!(render_req("k=%REQ(x-none)%", &h), None);
    }

    #[test]
    fn refusals_are_precise() {
        use HeaderRuleError as E;
        assert_eq!(req("novalue").unwrap_err(), E::NoEquals);
        assert_eq!(req("=v").unwrap_err(), E::EmptyName);
        assert_eq!(req("a b=v").unwrap_err(), E::BadName("a b".into()));
        assert_eq!(req("Host=x").unwrap_err(), E::RefusedName("host".into()));
        assert_eq!(
            req("Content-Length=1").unwrap_err(),
            E::RefusedName("content-length".into())
        );
        assert_eq!(req("k=a\rb").unwrap_err(), E::BadValue);
        assert_eq!(req("k=50%").unwrap_err(), E::LonePercent(2));
        assert_eq!(req("k=%foo%").unwrap_err(), E::LonePercent(0));
        assert_eq!(req("k=%NOPE%").unwrap_err(), E::Unknown("NOPE".into()));
        assert_eq!(
            req("k=%DOWNSTREAM_PEER_SUBJECT%").unwrap_err(),
            E::Unsupported("DOWNSTREAM_PEER_SUBJECT".into())
        );
        assert_eq!(
            req("k=%RESPONSE_CODE%").unwrap_err(),
            E::ResponseOnly("RESPONSE_CODE".into())
        );
        assert_eq!(
            req("k=%RESP(x)%").unwrap_err(),
            E::ResponseOnly("RESP".into())
        );
        assert_eq!(req("k=%START_TIME(%s)%").unwrap_err(), E::StartTimeFormat);
        assert_eq!(req("k=%REQ()%").unwrap_err(), E::NeedsHeader("REQ".into()));
        assert!(matches!(
            req("k=%REQ(:path)%").unwrap_err(),
            E::BadHeaderArgument { .. }
        ));
        assert_eq!(
            req("k=%PROTOCOL:3%").unwrap_err(),
            E::NoMaxLength("PROTOCOL".into())
        );
        assert_eq!(
            req("k=%REQ(x):0%").unwrap_err(),
            E::BadMaxLength("REQ".into())
        );
        assert_eq!(
            req("k=%PROTOCOL(x)%").unwrap_err(),
            E::NoArgument("PROTOCOL".into())
        );
        assert_eq!(req("k=a%REQ(x").unwrap_err(), E::LonePercent(1));
    }

    #[test]
    fn add_replaces_append_adds_in_order() {
        let rules: Vec<HeaderRule> = vec![
            HeaderRule::parse("x-a=one", Side::Request, false).unwrap(),
            HeaderRule::parse("x-b=two", Side::Request, true).unwrap(),
            HeaderRule::parse("x-c=%REQ(x-a)%!", Side::Request, false).unwrap(),
            HeaderRule::parse("x-d=", Side::Request, false).unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("old1"));
        h.append("x-a", HeaderValue::from_static("old2"));
        h.insert("x-b", HeaderValue::from_static("kept"));
        h.insert("x-d", HeaderValue::from_static("not removed"));
        apply_to_request(&rules, &mut h, &facts());
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["one"]);
        assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["kept", "two"]);
        assert_eq!(h["x-c"], "one!");
        assert_eq!(h["x-d"], "not removed");
    }

    #[test]
    fn response_rules_read_status_and_headers() {
        let rules = vec![
            HeaderRule::parse("x-status=%RESPONSE_CODE%", Side::Response, false).unwrap(),
            HeaderRule::parse("x-ct=%RESP(content-type)%", Side::Response, false).unwrap(),
            HeaderRule::parse("x-echo=%REQ(x-id)%", Side::Response, true).unwrap(),
        ];
        assert_eq!(request_headers_read(&rules), ["x-id"]);
        assert!(!reads_local_address(&rules));
        let mut req = HeaderMap::new();
        req.insert("x-id", HeaderValue::from_static("r1"));
        let mut resp = HeaderMap::new();
        resp.insert("content-type", HeaderValue::from_static("text/plain"));
        apply_to_response(&rules, StatusCode::NOT_FOUND, &mut resp, &req, &facts());
        assert_eq!(resp["x-status"], "404");
        assert_eq!(resp["x-ct"], "text/plain");
        assert_eq!(resp["x-echo"], "r1");
    }

    #[test]
    fn espv2_flags_keep_their_order_and_name_the_flag() {
        let f = Espv2HeaderFlags {
            add_request_header: vec!["a=1".into()],
            append_request_header: vec!["b=2".into()],
            add_response_header: vec![],
            append_response_header: vec!["c=%RESPONSE_CODE%".into()],
        };
        let (rq, rs) = from_espv2_flags(&f).unwrap();
        assert_eq!((rq.len(), rs.len()), (2, 1));
        assert!(!rq[0].append && rq[1].append && rs[0].append);
        let bad = Espv2HeaderFlags {
            add_request_header: vec!["a=%RESPONSE_CODE%".into()],
            ..Default::default()
        };
        let e = from_espv2_flags(&bad).unwrap_err();
        assert!(e.starts_with("invalid --add_request_header \"a=%RESPONSE_CODE%\": %RESPONSE_CODE% describes the response"), "{e}");
        assert_eq!(
            split_list("k1=v1;;k2=v2").collect::<Vec<_>>(),
            ["k1=v1", "k2=v2"]
        );
    }
}
