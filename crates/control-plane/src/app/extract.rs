//! Request extractors and helpers every API shares: the JSON body, the query parameters, and
//! the one paging helper.
//!
//! Layer rule: HTTP parsing only; no state, no storage.

use axum::extract::Request;

use crate::error::ApiError;

/// A JSON request body whose parse errors are Google-shaped (400 INVALID_ARGUMENT naming the
/// problem). An empty body parses as `{}` because gcloud sends none for some POSTs.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| ApiError::invalid_argument(format!("Cannot read request body: {e}")))?;
        parse_json_body(&bytes).map(JsonBody)
    }
}

/// Largest accepted request body (OpenAPI sources arrive base64-encoded in one JSON body).
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Parses a JSON body with Google-shaped errors; empty means `{}`.
pub fn parse_json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_argument(format!("Invalid JSON payload received. {e}")))
}

/// Query parameters as a map; unknown ones (gcloud's `alt=json`) are simply never read.
#[derive(Debug, Default, Clone)]
pub struct Params(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        Ok(Params(
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

impl Params {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// `pageSize` / `pageToken` → (limit, offset) under [`PageSizeWording::Integer`].
    pub fn page(&self, default_size: i64, max_size: i64) -> Result<(i64, i64), ApiError> {
        let clamp = |n: i64| usize::try_from(n).unwrap_or(0);
        let p = self.paging(
            clamp(default_size),
            clamp(max_size),
            PageSizeWording::Integer,
        )?;
        // Both came from non-negative i64s under this wording, so they convert back exactly.
        Ok((
            i64::try_from(p.size).unwrap_or(i64::MAX),
            i64::try_from(p.offset).unwrap_or(i64::MAX),
        ))
    }

    /// The one paging helper: `pageSize` / `pageToken` → [`Page`]. Tokens are base64 of the
    /// offset, which is what gcloud was seen following (`Mw==`, `Ng==`). An absent, empty or
    /// `0` size means `default_size`; larger sizes are capped at `max_size`.
    pub fn paging(
        &self,
        default_size: usize,
        max_size: usize,
        wording: PageSizeWording,
    ) -> Result<Page, ApiError> {
        let size = match (self.get("pageSize"), wording) {
            (None, PageSizeWording::Integer) => default_size,
            (None | Some("0"), PageSizeWording::Number) => default_size.min(max_size).max(1),
            (Some(s), PageSizeWording::Integer) => match s.parse::<i64>() {
                Ok(n) if n < 0 => {
                    return Err(ApiError::invalid_argument(format!(
                        "Invalid pageSize {n}: must not be negative."
                    )))
                }
                Ok(0) => default_size,
                Ok(n) => usize::try_from(n).unwrap_or(usize::MAX).min(max_size),
                Err(_) => {
                    return Err(ApiError::invalid_argument(format!(
                        "Invalid pageSize '{s}': expected an integer."
                    )))
                }
            },
            (Some(s), PageSizeWording::Number) => s
                .parse::<usize>()
                .map_err(|_| {
                    ApiError::invalid_argument(format!(
                        "Invalid pageSize '{s}': expected a number."
                    ))
                })?
                .min(max_size)
                .max(1),
        };
        let offset = match self.get("pageToken") {
            None => 0,
            Some(t) => {
                let decoded = match wording {
                    PageSizeWording::Integer => crate::authz::decode_base64_any(t)
                        .and_then(|b| String::from_utf8(b).ok())
                        .and_then(|s| s.parse::<i64>().ok())
                        .and_then(|n| usize::try_from(n).ok()),
                    PageSizeWording::Number => crate::crypto::decode_base64_lenient(t)
                        .and_then(|b| String::from_utf8(b).ok())
                        .and_then(|s| s.parse::<usize>().ok()),
                };
                decoded.ok_or_else(|| {
                    ApiError::invalid_argument(format!("Invalid pageToken '{t}'."))
                })?
            }
        };
        Ok(Page { offset, size })
    }
}

/// How a list call words (and bounds) a bad `pageSize`, and how it reads its page token. Two
/// exist because each API's answers are checked by clients and tests byte for byte:
/// - `Integer` (Service Management, Service Usage, operations): a negative size is refused as
///   negative, anything else unparsable "expected an integer"; tokens are read with
///   [`crate::authz::decode_base64_any`] as a non-negative `i64`.
/// - `Number` (IAM, API Keys): any size that is not an unsigned number "expected a number" (a
///   negative one included); a size that parses as 0 other than `0` itself (`00`) means 1;
///   tokens are read with [`crate::crypto::decode_base64_lenient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSizeWording {
    Integer,
    Number,
}

/// One page of a listing: skip `offset` items, return at most `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: usize,
    pub size: usize,
}

impl Page {
    /// The `nextPageToken` when `total` items exist, `None` on the last page.
    pub fn next_token(&self, total: usize) -> Option<String> {
        let next = self.offset + self.size;
        (next < total).then(|| page_token(i64::try_from(next).unwrap_or(i64::MAX)))
    }
}

/// The `nextPageToken` for a page that ended at `next_offset`.
pub fn page_token(next_offset: i64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(next_offset.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity APIs' paging (formerly `iam::page_bounds` / `next_page_token`).
    #[test]
    fn paging_round_trip() {
        let mut q = Params::default();
        q.0.insert("pageSize".to_string(), "2".to_string());
        let page = |q: &Params| {
            q.paging(100, 100, PageSizeWording::Number)
                .map(|p| (p.offset, p.size))
        };
        assert_eq!(page(&q).expect("bounds"), (0, 2));
        let t = Page { offset: 0, size: 2 }.next_token(5).expect("token");
        q.0.insert("pageToken".to_string(), t);
        assert_eq!(page(&q).expect("bounds"), (2, 2));
        assert_eq!(Page { offset: 4, size: 2 }.next_token(5), None);
        q.0.insert("pageToken".to_string(), "!!".to_string());
        assert!(page(&q).is_err());
    }

    #[test]
    fn page_size_wordings_stay_distinct() {
        let mut q = Params::default();
        q.0.insert("pageSize".to_string(), "-1".to_string());
        assert_eq!(
            q.page(50, 100).expect_err("negative").message,
            "Invalid pageSize -1: must not be negative."
        );
        assert_eq!(
            q.paging(50, 100, PageSizeWording::Number)
                .expect_err("negative")
                .message,
            "Invalid pageSize '-1': expected a number."
        );
        q.0.insert("pageSize".to_string(), "x".to_string());
        assert_eq!(
            q.page(50, 100).expect_err("junk").message,
            "Invalid pageSize 'x': expected an integer."
        );
    }
}
