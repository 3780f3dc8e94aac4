//! nginx's `large_client_header_buffers` for one request, line by line: the request line and
//! each header line must fit one buffer (`--large_client_header_buffers`, default `4 8k`). The
//! whole head is bounded before parsing (hyper's read buffer and HTTP/2's
//! `SETTINGS_MAX_HEADER_LIST_SIZE`, [`crate::server`]); these per-line checks apply after
//! parsing, the same for HTTP/1.1 and HTTP/2.

use crate::error::{Cause, Code, EspError};
use crate::settings::HeaderLimits;
use http::Request;

/// 414 (nginx's answer to an over-long request line), in ESP's format for nginx's errors.
fn uri_too_long() -> EspError {
    EspError::with_status(
        414,
        Code::FailedPrecondition,
        "URI_TOO_LONG",
        Cause::Application,
    )
}

/// 431 (what hyper answers for an over-long head), in ESP's format for nginx's errors.
fn header_too_large() -> EspError {
    EspError::with_status(
        431,
        Code::FailedPrecondition,
        "REQUEST_HEADER_FIELDS_TOO_LARGE",
        Cause::Application,
    )
}

/// The request line (`METHOD target HTTP/1.1`) or a header line (`name: value`) that is longer
/// than `limits.line`, as the error to answer.
pub fn head_line_error<B>(req: &Request<B>, limits: &HeaderLimits) -> Option<EspError> {
    let target = match req.uri().path_and_query() {
        Some(pq) => pq.as_str().len() + req.uri().authority().map_or(0, |a| a.as_str().len()),
        None => req.uri().to_string().len(),
    };
    // "METHOD SP target SP HTTP/1.1"
    if req.method().as_str().len() + target + 10 > limits.line {
        return Some(uri_too_long());
    }
    req.headers()
        .iter()
        .any(|(name, value)| name.as_str().len() + 2 + value.len() > limits.line)
        .then(header_too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HeaderLimits {
        HeaderLimits::default()
    }

    #[test]
    fn request_line_up_to_the_buffer_passes() {
        // "GET " + target + " HTTP/1.1" is exactly 8 KiB.
        let target = format!("/{}", "a".repeat(8192 - 4 - 9 - 1));
        let req = Request::get(target.as_str()).body(()).unwrap();
        assert!(head_line_error(&req, &limits()).is_none());
        let target = format!("/{}", "a".repeat(8192 - 4 - 9));
        let req = Request::get(target.as_str()).body(()).unwrap();
        let e = head_line_error(&req, &limits()).expect("too long");
        assert_eq!((e.http_status, e.code), (414, 9));
    }

    #[test]
    fn each_header_line_up_to_the_buffer_passes() {
        let name = "x-big";
        let ok = "v".repeat(8192 - name.len() - 2);
        let req = Request::get("/")
            .header(name, ok.as_str())
            .body(())
            .unwrap();
        assert!(head_line_error(&req, &limits()).is_none());
        let over = format!("{ok}v");
        let req = Request::get("/")
            .header("x-small", "1")
            .header(name, over.as_str())
            .body(())
            .unwrap();
        let e = head_line_error(&req, &limits()).expect("too large");
        assert_eq!(e.http_status, 431);
        assert!(e.body().contains("REQUEST_HEADER_FIELDS_TOO_LARGE"));
        // Duplicated headers are separate lines, each within the limit.
        let req = Request::get("/")
            .header(name, ok.as_str())
            .header(name, ok.as_str())
            .body(())
            .unwrap();
        assert!(head_line_error(&req, &limits()).is_none());
        // A larger --large_client_header_buffers size lets it through.
        let wide = HeaderLimits {
            line: 32 << 10,
            total: 128 << 10,
        };
        let req = Request::get("/")
            .header(name, over.as_str())
            .body(())
            .unwrap();
        assert!(head_line_error(&req, &wide).is_none());
    }
}
