//! Google-shaped API errors.
//!
//! Every handler returns `Result<_, ApiError>`. The response body is Google's
//! `{"error":{"code":<http>,"message":..,"status":"<CANONICAL>","details":[..]}}`, because gcloud
//! prints `status` as the prefix and `message` as the text (see `gcloud-wire.md` §13).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

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
        self.with_detail(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": field, "description": description}],
        }))
    }

    /// The JSON body (`{"error":{...}}`).
    pub fn body(&self) -> Value {
        let mut err = json!({
            "code": self.code.http_status(),
            "message": self.message,
            "status": self.code.name(),
        });
        if !self.details.is_empty() {
            err["details"] = Value::Array(self.details.clone());
        }
        json!({ "error": err })
    }

    /// The `google.rpc.Status` form used inside `Operation.error`.
    pub fn rpc_status(&self) -> Value {
        let mut s = json!({"code": self.code.as_i32(), "message": self.message});
        if !self.details.is_empty() {
            s["details"] = Value::Array(self.details.clone());
        }
        s
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (http_status(self.code), axum::Json(self.body())).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(format_args!("database: {e}"))
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
