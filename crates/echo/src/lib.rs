//! The Cloud Endpoints getting-started sample backend, so the walkthrough can be followed without
//! Python: `portico echo`.
//!
//! Routes (the same as Google's Python sample, `endpoints/getting-started/main.py`):
//! - `POST /echo` answers with the JSON document it received. A body that is not JSON is a
//!   400 with `{"code":400,"message":...}`, the "swagger-compliant" error shape the samples use.
//! - `GET /auth/info/googlejwt`, `/auth/info/googleidtoken`, `/auth/info/firebase` decode the
//!   `X-Endpoint-API-UserInfo` header that the proxy adds after authenticating a JWT and answer
//!   with the decoded JSON. `/auth/info/firebase` also allows any origin (CORS), as the sample does.
//!
//! Where this deliberately differs from the Python sample:
//! - A missing or empty `X-Endpoint-API-UserInfo` is a 401, not `{"id":"anonymous"}`. The proxy
//!   blanks client-supplied copies of the header, so an empty value means "the proxy did not
//!   authenticate anyone" and answering as if someone had been authenticated would hide a
//!   misconfigured route.
//! - The header is decoded with either base64 alphabet and with or without padding: ESP v1 sends
//!   padded URL-safe base64, ESPv2 unpadded URL-safe, and hand-written clients often use the
//!   standard alphabet. The Python sample silently drops URL-safe characters instead.
//!
//! The entry points are [`cli::main`] (the `portico echo` subcommand) and [`serve`] for tests and
//! other in-process use.

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::{json, Value};
use std::future::Future;
use tokio::net::TcpListener;

/// The header the proxy fills with the authenticated caller's identity.
pub const USER_INFO_HEADER: &str = "x-endpoint-api-userinfo";

/// Request bodies above this are refused; the sample only ever echoes short messages and a bound
/// keeps a misbehaving client from making the backend buffer without limit.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Errors from decoding `X-Endpoint-API-UserInfo`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserInfoError {
    #[error("the X-Endpoint-API-UserInfo header is missing or empty; the request did not pass through a proxy that authenticated a caller")]
    Missing,
    #[error("the X-Endpoint-API-UserInfo header is not valid base64 (either alphabet, padding optional)")]
    NotBase64,
    #[error("the X-Endpoint-API-UserInfo header does not decode to JSON: {0}")]
    NotJson(String),
}

const fn indifferent(alphabet: &alphabet::Alphabet) -> GeneralPurpose {
    GeneralPurpose::new(
        alphabet,
        GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

const URL_SAFE_ANY_PAD: GeneralPurpose = indifferent(&alphabet::URL_SAFE);
const STANDARD_ANY_PAD: GeneralPurpose = indifferent(&alphabet::STANDARD);

/// Decodes the value of `X-Endpoint-API-UserInfo` into the JSON it carries.
///
/// `None` and an all-blank value are [`UserInfoError::Missing`].
pub fn decode_user_info(raw: Option<&[u8]>) -> Result<Value, UserInfoError> {
    let raw = raw.unwrap_or_default();
    let text = std::str::from_utf8(raw).map_err(|_| UserInfoError::NotBase64)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(UserInfoError::Missing);
    }
    let bytes = URL_SAFE_ANY_PAD
        .decode(text)
        .or_else(|_| STANDARD_ANY_PAD.decode(text))
        .map_err(|_| UserInfoError::NotBase64)?;
    serde_json::from_slice(&bytes).map_err(|e| UserInfoError::NotJson(e.to_string()))
}

/// The sample's error body: `{"code": N, "message": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({ "code": status.as_u16(), "message": message.into() });
    (status, json_body(&body)).into_response()
}

/// Compact JSON with a trailing newline, as Flask's `jsonify` writes it.
fn json_body(value: &Value) -> ([(header::HeaderName, HeaderValue); 1], String) {
    let mut text = value.to_string();
    text.push('\n');
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        text,
    )
}

async fn echo(body: Bytes) -> Response {
    match serde_json::from_slice::<Value>(&body) {
        Ok(value) => (StatusCode::OK, json_body(&value)).into_response(),
        Err(e) if body.iter().all(u8::is_ascii_whitespace) => {
            tracing::debug!(error = %e, "empty /echo body");
            error(
                StatusCode::BAD_REQUEST,
                "the request body is empty; send a JSON document such as {\"message\":\"hello world\"}",
            )
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        ),
    }
}

async fn auth_info(headers: HeaderMap) -> Response {
    let raw = headers.get(USER_INFO_HEADER).map(HeaderValue::as_bytes);
    match decode_user_info(raw) {
        Ok(value) => (StatusCode::OK, json_body(&value)).into_response(),
        Err(e @ UserInfoError::Missing) => error(StatusCode::UNAUTHORIZED, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `/auth/info/firebase` is called from browsers in the sample, so it allows any origin.
async fn auth_info_cors(headers: HeaderMap) -> Response {
    let mut response = auth_info(headers).await;
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

async fn firebase_preflight() -> Response {
    (
        StatusCode::OK,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, OPTIONS"),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Authorization, Content-Type",
            ),
        ],
    )
        .into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such route; the sample serves POST /echo and GET /auth/info/{googlejwt,googleidtoken,firebase}",
    )
}

/// The sample's routes.
pub fn router() -> Router {
    Router::new()
        .route("/echo", post(echo))
        .route("/auth/info/googlejwt", get(auth_info))
        .route("/auth/info/googleidtoken", get(auth_info))
        .route(
            "/auth/info/firebase",
            get(auth_info_cors).options(firebase_preflight),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Serves the sample on `listener` until the process ends.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    axum::serve(listener, router()).await
}

/// Serves the sample on `listener` until `shutdown` completes, then finishes in-flight requests.
pub async fn serve_with_shutdown<F>(listener: TcpListener, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

pub mod cli {
    //! `portico echo [--port N | --listen ADDR]`.

    use clap::Parser;
    use std::ffi::OsString;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::process::ExitCode;

    #[derive(Debug, Parser)]
    #[command(
        name = "portico echo",
        about = "The Cloud Endpoints getting-started sample backend: POST /echo, GET /auth/info/{googlejwt,googleidtoken,firebase}"
    )]
    struct Args {
        /// Port to listen on (on 127.0.0.1 unless --listen gives an address).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Full listen address, e.g. 0.0.0.0:8080 inside a container; overrides --port.
        #[arg(long)]
        listen: Option<SocketAddr>,
    }

    /// Entry point for the `portico echo` subcommand; `args[0]` is the subcommand name.
    pub fn main(args: Vec<OsString>) -> ExitCode {
        let args = match Args::try_parse_from(args) {
            Ok(a) => a,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
        let addr = args
            .listen
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), args.port));
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("portico echo: cannot start the runtime: {e}");
                return ExitCode::from(3);
            }
        };
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    eprintln!(
                        "portico echo: port {} is already in use; pass --port",
                        addr.port()
                    );
                    return ExitCode::from(3);
                }
                Err(e) => {
                    eprintln!("portico echo: cannot listen on {addr}: {e}");
                    return ExitCode::from(3);
                }
            };
            let local = listener.local_addr().unwrap_or(addr);
            tracing::info!(%local, "echo sample listening");
            let shutdown = async {
                portico_listen::shutdown_signal().await;
                tracing::info!("shutting down");
            };
            match super::serve_with_shutdown(listener, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("portico echo: {e}");
                    ExitCode::from(1)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

    #[test]
    fn decodes_every_alphabet_and_padding() {
        // `?>` makes the encodings differ between alphabets ('/' vs '_') and need padding.
        let doc = json!({"id": "123", "email": "a?>b@example.com"});
        let text = doc.to_string();
        for encoded in [
            URL_SAFE.encode(&text),
            URL_SAFE_NO_PAD.encode(&text),
            STANDARD.encode(&text),
            STANDARD.encode(&text).trim_end_matches('=').to_string(),
        ] {
            assert_eq!(
                decode_user_info(Some(encoded.as_bytes())),
                Ok(doc.clone()),
                "{encoded}"
            );
        }
        assert!(URL_SAFE.encode(&text) != STANDARD.encode(&text));
    }

    #[test]
    fn missing_and_blank_are_missing() {
        assert_eq!(decode_user_info(None), Err(UserInfoError::Missing));
        assert_eq!(decode_user_info(Some(b"")), Err(UserInfoError::Missing));
        assert_eq!(decode_user_info(Some(b"  ")), Err(UserInfoError::Missing));
    }

    #[test]
    fn garbage_is_rejected_precisely() {
        assert_eq!(
            decode_user_info(Some(b"not base64!")),
            Err(UserInfoError::NotBase64)
        );
        let not_json = URL_SAFE.encode("plain text");
        assert!(matches!(
            decode_user_info(Some(not_json.as_bytes())),
            Err(UserInfoError::NotJson(_))
        ));
    }
}
