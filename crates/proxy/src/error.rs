//! Errors the proxy itself generates. Each [`EspError`] carries ESP v1's words for it (HTTP
//! status, canonical code, message, cause: [`EspError::body`] prints them exactly as ESP v1
//! does, a pretty-printed `google.rpc.Status` with 1-space indent, field-number order, trailing
//! newline and one `DebugInfo` detail naming the cause) and the situation it stands for
//! ([`ErrorKind`]), from which [`crate::dialect`] words it as ESPv2 would. Nothing decides a
//! dialect's answer by reading another dialect's message.
//! Backend errors never go through here: they pass through untouched.

pub use portico_servicecontrol::Code;
use std::fmt;

/// What caused a proxy-generated error (`DebugInfo.detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Internal,
    Application,
    Auth,
    ServiceControl,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Internal => "internal",
            Cause::Application => "application",
            Cause::Auth => "auth",
            Cause::ServiceControl => "service_control",
        }
    }
}

/// What a `:check` that refused the request still established about its caller: the API key
/// itself is valid and its project has the API enabled (the refusal was for another reason,
/// such as `API_TARGET_BLOCKED` or `PROJECT_INVALID`), so the report names the consumer, as
/// ESP's does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownConsumer {
    pub consumer_project_number: Option<i64>,
    pub api_key_uid: Option<String>,
}

/// The situation a proxy error stands for, whatever the words. Set where the error is made;
/// [`crate::dialect::Dialect::render`] turns it into ESPv2's status and message. ESP v1's words
/// are the [`EspError`]'s own fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorKind {
    /// A refusal ESPv2 has no words of its own for (Portico's own checks, the HTTP-level limits
    /// nginx and Envoy apply before either proxy's logic): every dialect prints the error's
    /// status and message.
    #[default]
    Portico,
    /// No HTTP rule matches the request's path, for any method.
    PathNotDefined,
    /// An HTTP rule matches the path, for other methods: `template` is that rule's path
    /// template as the service config writes it. Made only in the ESPv2 dialect.
    MethodNotAllowed { template: Box<str> },
    /// `--cors_preset` is set and an `OPTIONS` request lacks `Origin` or
    /// `Access-Control-Request-Method`, or its origin is not allowed. Made only in the ESPv2
    /// dialect.
    CorsPreflightRefused,
    /// The JWT check failed.
    Jwt(JwtProblem),
    /// The method needs an API key and the request has none.
    UnregisteredCaller,
    /// `:check` answered with a check error; `code` is its name (`API_KEY_INVALID`), or its
    /// number for a code the proxy does not know; `service` is the service's name.
    CheckRefused { code: Box<str>, service: Box<str> },
    /// `:check` could not be made or got no usable answer, and the network fail policy is
    /// `close` (or the failure is one the policy never forgives).
    ServiceControlFailed(ScFailure),
    /// An earlier `:allocateQuota` for the same consumer and method was refused.
    QuotaRefused {
        code: Box<str>,
        description: Box<str>,
    },
    /// The backend could not be reached, or broke the exchange before its response head;
    /// `retried`: after further attempts (ESPv2's `--backend_retry_num`).
    BackendFailed { how: NetworkFailure, retried: bool },
    /// The backend did not answer within the method's deadline.
    BackendTimeout,
    /// The request body is larger than `--client_max_body_size`.
    PayloadTooLarge,
    /// The method's backend needs an ID token for `audience` and none could be had.
    BackendIdToken { audience: Box<str> },
}

/// Why a JWT was refused, in the terms of ESPv2's verifier (google/jwt_verify_lib as Envoy's
/// `jwt_authn` uses it). ESP v1's message for the same failure is the [`EspError`]'s own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtProblem {
    Missing,
    /// Not three dot-separated sections (or empty).
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    /// `alg` is missing or not a string.
    HeaderBadAlg,
    HeaderUnsupportedAlg,
    PayloadBadBase64,
    /// The payload is not a JSON object.
    PayloadBadJson,
    /// The named claim (`iss`, `sub`, `jti`) is not a string.
    ClaimNotString(&'static str),
    /// The named time claim (`exp`, `nbf`, `iat`) is not a number.
    ClaimNotInteger(&'static str),
    /// The named time claim is not a positive number.
    ClaimNotPositive(&'static str),
    /// `aud` is neither a string nor a list of strings.
    AudienceNotStrings,
    SignatureBadBase64,
    Expired,
    NotYetValid,
    /// No requirement of the method names the token's issuer.
    UnknownIssuer,
    /// The token names no audience the method accepts (403).
    AudienceNotAllowed,
    /// The key set could not be fetched, or is unusable.
    JwksFetchFailed,
    /// No key of the set matches the token's `kid` and `alg`.
    KidAlgMismatch,
    /// The signature does not verify (or the token fails a check ESPv2's verifier does not
    /// make, such as an email issuer asserting another subject).
    VerificationFailed,
    /// The proxy failed, not the token.
    Internal,
}

/// How a call to a peer (Service Control, a backend) failed without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkFailure {
    /// The TCP connection failed with this OS error number (111: refused).
    Connect(i32),
    /// The peer's name did not resolve.
    Unresolved,
    /// No answer in time.
    Timeout,
    /// The TLS handshake failed.
    Tls,
    /// The connection closed or reset before a response head.
    Reset,
    /// An HTTP/2 peer refused the stream (`REFUSED_STREAM`) before a response head.
    RefusedStream,
    /// No TCP connection within the connect timeout (`--cluster_connect_timeout`).
    ConnectTimeout,
    /// The backend already carries its maximum of requests in flight
    /// (`--backend_cluster_maximum_requests`); nothing was sent.
    Overflow,
}

/// How a `:check` call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScFailure {
    /// No answer.
    Network(NetworkFailure),
    /// An answer with a status other than 200.
    Http { status: u16, body: Box<str> },
    /// 200 with a body that is not a response.
    Invalid,
    /// No access token for the call.
    Token,
}

/// A proxy-generated error: ESP v1's HTTP status, canonical code, message and cause, and the
/// situation it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspError {
    pub http_status: u16,
    /// Canonical gRPC code ([`Code`] as its number, what the body carries), not the HTTP
    /// status.
    pub code: i32,
    pub message: String,
    pub cause: Cause,
    /// Set only on a `:check` refusal whose key was valid.
    pub known_consumer: Option<Box<KnownConsumer>>,
    /// What happened, for the dialects that word it otherwise.
    pub kind: ErrorKind,
}

impl EspError {
    /// An error from a canonical code; the HTTP status follows ESP's mapping.
    pub fn new(code: Code, message: impl Into<String>, cause: Cause) -> Self {
        EspError {
            http_status: code.http_status(),
            code: code.as_i32(),
            message: message.into(),
            cause,
            known_consumer: None,
            kind: ErrorKind::Portico,
        }
    }

    /// The same error, standing for `kind`.
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// An error with an explicit HTTP status (for the few rows of ESP's catalogue where the
    /// status does not follow from the code, e.g. Service Control 5xx pass-through).
    pub fn with_status(
        http_status: u16,
        code: Code,
        message: impl Into<String>,
        cause: Cause,
    ) -> Self {
        EspError {
            http_status,
            code: code.as_i32(),
            message: message.into(),
            cause,
            known_consumer: None,
            kind: ErrorKind::Portico,
        }
    }

    /// 404 code 5: no HTTP rule matched.
    pub fn method_does_not_exist() -> Self {
        Self::new(
            Code::NotFound,
            "Method does not exist.",
            Cause::ServiceControl,
        )
        .with_kind(ErrorKind::PathNotDefined)
    }

    /// 403 code 7: unmatched OPTIONS without CORS.
    pub fn cors_not_allowed() -> Self {
        Self::new(
            Code::PermissionDenied,
            "The service does not allow CORS traffic.",
            Cause::ServiceControl,
        )
        .with_kind(ErrorKind::PathNotDefined)
    }

    /// 401 code 16: the method needs a consumer and no API key was given.
    pub fn unregistered_caller() -> Self {
        Self::new(
            Code::Unauthenticated,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
            Cause::ServiceControl,
        )
        .with_kind(ErrorKind::UnregisteredCaller)
    }

    /// 502 code 13: the backend could not be reached, or broke the exchange (`how`; after
    /// retries when `retried`).
    pub fn bad_gateway(how: NetworkFailure, retried: bool) -> Self {
        Self::with_status(502, Code::Internal, "BAD_GATEWAY", Cause::Application)
            .with_kind(ErrorKind::BackendFailed { how, retried })
    }

    /// 504 code 4: the backend did not answer in time.
    pub fn gateway_timeout() -> Self {
        Self::with_status(
            504,
            Code::DeadlineExceeded,
            "GATEWAY_TIMEOUT",
            Cause::Application,
        )
        .with_kind(ErrorKind::BackendTimeout)
    }

    /// 413: request body over `--client_max_body_size`.
    pub fn payload_too_large() -> Self {
        Self::with_status(
            413,
            Code::FailedPrecondition,
            "PAYLOAD_TOO_LARGE",
            Cause::Internal,
        )
        .with_kind(ErrorKind::PayloadTooLarge)
    }

    /// The JSON body, byte for byte as ESP prints it.
    pub fn body(&self) -> String {
        format!(
            "{{\n \"code\": {},\n \"message\": {},\n \"details\": [\n  {{\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"{}\"\n  }}\n ]\n}}\n",
            self.code,
            json_string(&self.message),
            self.cause.as_str()
        )
    }
}

impl fmt::Display for EspError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (code {}): {}",
            self.http_status, self.code, self.message
        )
    }
}

impl std::error::Error for EspError {}

fn json_string(s: &str) -> String {
    // serde_json's escaping matches protobuf's JSON printer for the characters that appear in
    // our messages (quotes, backslashes, control characters).
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// How a call failed without an answer, read from its error chain: a TLS error, a timeout, an
/// OS error while `connecting` (the connection was refused, the network unreachable, ...), a
/// name that did not resolve, or else a broken connection.
pub(crate) fn network_failure(
    e: &(dyn std::error::Error + 'static),
    connecting: bool,
) -> NetworkFailure {
    let mut unresolved = false;
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return NetworkFailure::Tls;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                // While connecting, the connect timeout (Envoy's `connection timeout`), not the
                // response deadline.
                return if connecting {
                    NetworkFailure::ConnectTimeout
                } else {
                    NetworkFailure::Timeout
                };
            }
            if io
                .get_ref()
                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
            {
                return NetworkFailure::Tls;
            }
            if let (true, Some(n)) = (connecting, io.raw_os_error()) {
                return NetworkFailure::Connect(n);
            }
        }
        // getaddrinfo's failures carry no OS error number; their text names the lookup.
        let text = s.to_string();
        if text.contains("dns error") || text.contains("lookup address") {
            unresolved = true;
        }
        src = s.source();
    }
    if unresolved {
        NetworkFailure::Unresolved
    } else {
        NetworkFailure::Reset
    }
}

/// An error with its whole `source()` chain, `: `-joined: the top-level messages of reqwest and
/// hyper hide the cause ("error sending request", "client error (Connect)").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_gateway_body_is_byte_exact() {
        let expected = "{\n \"code\": 13,\n \"message\": \"BAD_GATEWAY\",\n \"details\": [\n  {\n   \"@type\": \"type.googleapis.com/google.rpc.DebugInfo\",\n   \"stackEntries\": [],\n   \"detail\": \"application\"\n  }\n ]\n}\n";
        let e = EspError::bad_gateway(NetworkFailure::Connect(111), true);
        assert_eq!(e.http_status, 502);
        assert_eq!(e.body(), expected);
    }

    #[test]
    fn unregistered_is_401_code_16() {
        let e = EspError::unregistered_caller();
        assert_eq!((e.http_status, e.code), (401, 16));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["details"][0]["detail"], "service_control");
        assert!(v["message"]
            .as_str()
            .unwrap()
            .starts_with("Method doesn't allow unregistered"));
    }

    #[test]
    fn code_mapping_round_trips_common_statuses() {
        for (status, code) in [
            (400, 3),
            (401, 16),
            (403, 7),
            (404, 5),
            (429, 8),
            (503, 14),
            (504, 4),
        ] {
            assert_eq!(Code::from_http_status(status).as_i32(), code);
            assert_eq!(Code::from_i32(code).http_status(), status);
        }
        assert_eq!(Code::from_http_status(418).as_i32(), 9);
        assert_eq!(Code::from_http_status(502).as_i32(), 13);
    }
}
