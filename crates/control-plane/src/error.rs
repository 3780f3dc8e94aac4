//! Google-shaped API errors.
//!
//! Every handler returns `Result<_, ApiError>`. The response body is Google's
//! `{"error":{"code":<http>,"message":..,"status":"<CANONICAL>","details":[..]}}`, because gcloud
//! prints `status` as the prefix and `message` as the text (see `gcloud-wire.md` §13).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// `google.rpc.Code`, shared with the proxy (`portico_servicecontrol::Code`).
pub use portico_servicecontrol::Code;

/// The HTTP status a code answers with (Google's mapping).
fn http_status(code: Code) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An error answered to an API caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// `google.protobuf.Any` detail objects (each with an `@type`).
    pub details: Vec<Value>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }
    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, m)
    }
    pub fn failed_precondition(m: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, m)
    }
    pub fn unauthenticated(m: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, m)
    }
    pub fn permission_denied(m: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Code::NotFound, m)
    }
    pub fn already_exists(m: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, m)
    }
    pub fn aborted(m: impl Into<String>) -> Self {
        Self::new(Code::Aborted, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, m)
    }
    pub fn unimplemented(m: impl Into<String>) -> Self {
        Self::new(Code::Unimplemented, m)
    }
    /// An internal failure. The cause is logged here; callers only see a generic message so
    /// storage details (paths, SQL) never leak.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(Code::Internal, "Internal error encountered.")
    }

    pub fn with_detail(mut self, detail: Value) -> Self {
        self.details.push(detail);
        self
    }

    /// A `google.rpc.BadRequest` detail naming one offending field.
    pub fn with_field_violation(self, field: &str, description: &str) -> Self {
        let detail = BadRequest {
            type_url: BAD_REQUEST_TYPE,
            field_violations: [FieldViolation { field, description }],
        };
        self.with_detail(serde_json::to_value(detail).unwrap_or_default())
    }

    fn wire(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorStatus {
                code: self.code.http_status(),
                message: &self.message,
                status: self.code.name(),
                details: &self.details,
            },
        }
    }

    /// The JSON body (`{"error":{...}}`).
    pub fn body(&self) -> Value {
        serde_json::to_value(self.wire()).unwrap_or_default()
    }

    /// The `google.rpc.Status` form used inside `Operation.error`.
    pub fn rpc_status(&self) -> Value {
        serde_json::to_value(RpcStatus {
            code: self.code.as_i32(),
            message: &self.message,
            details: &self.details,
        })
        .unwrap_or_default()
    }
}

/// Google's REST error body. Unlike `google.rpc.Status`, `code` is the HTTP status and
/// `status` the canonical code's name (what gcloud prints).
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorStatus<'a>,
}

#[derive(Serialize)]
struct ErrorStatus<'a> {
    code: u16,
    message: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "<[Value]>::is_empty")]
    details: &'a [Value],
}

/// `google.rpc.Status`, with `message` always present (the wire type in
/// `portico_servicecontrol` leaves an empty one out).
#[derive(Serialize)]
struct RpcStatus<'a> {
    code: i32,
    message: &'a str,
    #[serde(skip_serializing_if = "<[Value]>::is_empty")]
    details: &'a [Value],
}

const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";

/// `google.rpc.BadRequest` naming one field.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BadRequest<'a> {
    #[serde(rename = "@type")]
    type_url: &'static str,
    field_violations: [FieldViolation<'a>; 1],
}

#[derive(Serialize)]
struct FieldViolation<'a> {
    field: &'a str,
    description: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (http_status(self.code), axum::Json(self.wire())).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::internal(format_args!("stored JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_google_shape() {
        let e = ApiError::aborted("conflict").with_field_violation("etag", "stale");
        let b = e.body();
        assert_eq!(b["error"]["code"], 409);
        assert_eq!(b["error"]["status"], "ABORTED");
        assert_eq!(b["error"]["message"], "conflict");
        assert_eq!(
            b["error"]["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(e.rpc_status()["code"], 10);
    }

    #[test]
    fn no_details_key_when_empty() {
        let b = ApiError::not_found("x").body();
        assert!(b["error"].get("details").is_none());
        assert_eq!(b["error"]["code"], 404);
    }
}
