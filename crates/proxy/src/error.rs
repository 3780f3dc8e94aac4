//! Errors the proxy itself generates, rendered exactly as ESP v1 renders them: a pretty-printed
//! `google.rpc.Status` (1-space indent, field-number order, trailing newline) whose `code` is the
//! canonical gRPC code and whose single `DebugInfo` detail names the cause.
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

/// A proxy-generated error: HTTP status, canonical code, message and cause.
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
        }
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
        }
    }

    /// 404 code 5: no HTTP rule matched.
    pub fn method_does_not_exist() -> Self {
        Self::new(
            Code::NotFound,
            "Method does not exist.",
            Cause::ServiceControl,
        )
    }

    /// 403 code 7: unmatched OPTIONS without CORS.
    pub fn cors_not_allowed() -> Self {
        Self::new(
            Code::PermissionDenied,
            "The service does not allow CORS traffic.",
            Cause::ServiceControl,
        )
    }

    /// 401 code 16: the method needs a consumer and no API key was given.
    pub fn unregistered_caller() -> Self {
        Self::new(
            Code::Unauthenticated,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
            Cause::ServiceControl,
        )
    }

    /// 502 code 13: the backend could not be reached.
    pub fn bad_gateway() -> Self {
        Self::with_status(502, Code::Internal, "BAD_GATEWAY", Cause::Application)
    }

    /// 504 code 4: the backend did not answer in time.
    pub fn gateway_timeout() -> Self {
        Self::with_status(
            504,
            Code::DeadlineExceeded,
            "GATEWAY_TIMEOUT",
            Cause::Application,
        )
    }

    /// 413: request body over `--client_max_body_size`.
    pub fn payload_too_large() -> Self {
        Self::with_status(
            413,
            Code::FailedPrecondition,
            "PAYLOAD_TOO_LARGE",
            Cause::Internal,
        )
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
        let e = EspError::bad_gateway();
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
