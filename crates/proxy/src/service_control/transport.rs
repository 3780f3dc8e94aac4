//! One Service Control call: `POST {base}/v1/services/{svc}:{method}` with a JSON body and a
//! self-signed bearer token, a per-call timeout, and retries on transport errors only.
//!
//! Failures are classified the way ESP's policy needs them: transport (DNS/connect/timeout),
//! an HTTP status other than 200 (with the body), or a 200 whose body does not parse.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config_source::PATH_SEGMENT;
use crate::error::error_chain;
use crate::error::{Cause, Code, ErrorKind, EspError, NetworkFailure, ScFailure};
use crate::outbound_auth::{TokenError, TokenSource};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// DNS, connect, TLS, timeout: the peer was not reached or did not answer (how, and the
    /// error's text).
    Network(NetworkFailure, String),
    /// The peer answered with a status other than 200.
    Http { status: u16, body: String },
    /// 200 with a body that is not the expected JSON.
    Invalid(String),
    /// No access token for the call (the metadata server failed); the call was not made.
    Token(TokenError),
}

impl Failure {
    /// Network errors and HTTP 5xx are what `--service_control_network_fail_policy=open`
    /// forgives; 4xx and garbage never are (ESP 1.50).
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            Failure::Network(..) => true,
            Failure::Http { status, .. } => *status >= 500,
            Failure::Invalid(_) | Failure::Token(_) => false,
        }
    }

    /// Whether `--service_control_network_fail_policy=open` forgives this `:check` failure in
    /// `dialect` (ESP 1.50: no answer or any 5xx; ESPv2: what Envoy calls unavailable).
    pub(crate) fn may_fail_open(&self, dialect: crate::dialect::Dialect) -> bool {
        match self {
            Failure::Network(..) => dialect.check_failure_may_fail_open(None),
            Failure::Http { status, .. } => dialect.check_failure_may_fail_open(Some(*status)),
            Failure::Invalid(_) | Failure::Token(_) => false,
        }
    }

    /// A report that failed this way can be sent again later with the same body.
    pub(crate) fn is_transient(&self) -> bool {
        self.is_unavailable() || matches!(self, Failure::Token(_))
    }

    /// The client-facing error for this failure, per ESP's catalogue.
    pub(crate) fn to_esp_error(&self) -> EspError {
        match self {
            Failure::Network(how, _) => EspError::new(
                Code::Unavailable,
                "Failed to connect to service control",
                Cause::ServiceControl,
            )
            .with_kind(ErrorKind::ServiceControlFailed(ScFailure::Network(*how))),
            Failure::Http { status, body } => {
                let message = if body.trim().is_empty() {
                    format!("Service control request failed with HTTP response code {status}")
                } else {
                    body.trim().to_string()
                };
                let (http, code) = match status {
                    501 => (501, Code::Unimplemented),
                    503 => (503, Code::Unavailable),
                    504 => (504, Code::DeadlineExceeded),
                    // 500, 502, other 5xx, and every 4xx: the proxy itself failed the request.
                    _ => (500, Code::Internal),
                };
                EspError::with_status(http, code, message, Cause::ServiceControl).with_kind(
                    ErrorKind::ServiceControlFailed(ScFailure::Http {
                        status: *status,
                        body: body.as_str().into(),
                    }),
                )
            }
            Failure::Invalid(_) => {
                EspError::new(Code::Internal, "Invalid response", Cause::ServiceControl)
                    .with_kind(ErrorKind::ServiceControlFailed(ScFailure::Invalid))
            }
            Failure::Token(e) => {
                EspError::new(Code::Internal, e.client_message(), Cause::ServiceControl)
                    .with_kind(ErrorKind::ServiceControlFailed(ScFailure::Token))
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Network(_, m) => write!(f, "network error: {m}"),
            Failure::Http { status, body } => {
                let b: String = body.chars().take(300).collect();
                write!(f, "HTTP {status}: {b}")
            }
            Failure::Invalid(m) => write!(f, "invalid response: {m}"),
            Failure::Token(e) => write!(f, "no access token: {e}"),
        }
    }
}

/// How a call that got no answer failed.
fn network_failure(e: &reqwest::Error) -> NetworkFailure {
    if e.is_timeout() {
        NetworkFailure::Timeout
    } else {
        crate::error::network_failure(e, e.is_connect())
    }
}

#[derive(Clone)]
pub(crate) struct Transport {
    http: reqwest::Client,
    base: String,
    tokens: TokenSource,
}

impl Transport {
    pub(crate) fn new(
        base: &str,
        tokens: TokenSource,
        connect_timeout: Option<Duration>,
    ) -> Result<Self, reqwest::Error> {
        let mut http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(60));
        if let Some(t) = connect_timeout {
            http = http.connect_timeout(t);
        }
        let http = http.build()?;
        Ok(Transport {
            http,
            base: base.trim_end_matches('/').to_string(),
            tokens,
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// Gets (and caches) the token a `:check` would carry.
    pub(crate) async fn token_ready(&self) -> Result<(), TokenError> {
        let audience = format!("{}{}", self.base, crate::outbound_auth::SERVICE_CONTROLLER);
        self.tokens.authorization(&audience).await.map(|_| ())
    }

    /// `method` is `check`, `report` or `allocateQuota`; `audience_suffix` picks the token;
    /// `context` (a request's trace, on ESPv2's `:check`) writes each attempt's context headers
    /// and keeps its times.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        audience_suffix: &str,
        body: &Req,
        timeout: Duration,
        retries: u32,
        context: Option<&crate::trace::CallTrace>,
    ) -> Result<Resp, Failure> {
        let payload =
            serde_json::to_vec(body).map_err(|e| Failure::Invalid(format!("encode: {e}")))?;
        self.call_encoded(
            service,
            method,
            audience_suffix,
            payload,
            timeout,
            retries,
            context,
        )
        .await
    }

    /// As [`Transport::call`], with the JSON body already encoded.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call_encoded<Resp: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        audience_suffix: &str,
        payload: Vec<u8>,
        timeout: Duration,
        retries: u32,
        context: Option<&crate::trace::CallTrace>,
    ) -> Result<Resp, Failure> {
        let url = format!(
            "{}/v1/services/{}:{}",
            self.base,
            percent_encoding::utf8_percent_encode(service, PATH_SEGMENT),
            method
        );
        let audience = format!("{}{}", self.base, audience_suffix);
        let payload = bytes::Bytes::from(payload);
        let mut attempt = 0;
        loop {
            let auth = self
                .tokens
                .authorization(&audience)
                .await
                .map_err(Failure::Token)?;
            let mut req = self
                .http
                .post(&url)
                .timeout(timeout)
                .header(http::header::CONTENT_TYPE, "application/json")
                // Bytes clones are reference counts, so retries do not copy the body.
                .body(payload.clone());
            if let Some(auth) = auth {
                req = req.header(http::header::AUTHORIZATION, auth);
            }
            let mut traced = None;
            if let Some(c) = context {
                let mut h = http::HeaderMap::new();
                traced = Some((c, c.begin(&mut h)));
                req = req.headers(h);
            }
            let answer = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    resp.bytes().await.map(|b| (status, b))
                }
                Err(e) => Err(e),
            };
            // The attempt's span ends with its answer (ESPv2's span per attempt).
            if let Some((c, a)) = traced {
                c.end(a);
            }
            let outcome = match answer {
                Ok((200, bytes)) => {
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| Failure::Invalid(e.to_string()));
                }
                Ok((status, bytes)) => {
                    return Err(Failure::Http {
                        status,
                        body: String::from_utf8_lossy(&bytes).into_owned(),
                    })
                }
                Err(e) => Failure::Network(network_failure(&e), error_chain(&e)),
            };
            if attempt >= retries {
                return Err(outcome);
            }
            attempt += 1;
            tracing::debug!(%url, attempt, error = %outcome, "retrying Service Control call");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_mapping_follows_the_catalogue() {
        let net = Failure::Network(NetworkFailure::Connect(111), "refused".into()).to_esp_error();
        assert_eq!((net.http_status, net.code), (503, 14));
        assert_eq!(net.message, "Failed to connect to service control");
        let cases = [
            (500, 500, 13),
            (502, 500, 13),
            (501, 501, 12),
            (503, 503, 14),
            (504, 504, 4),
            (507, 500, 13),
            (403, 500, 13),
            (404, 500, 13),
        ];
        for (sc, http, code) in cases {
            let e = Failure::Http {
                status: sc,
                body: String::new(),
            }
            .to_esp_error();
            assert_eq!((e.http_status, e.code), (http, code), "SC {sc}");
            assert_eq!(
                e.message,
                format!("Service control request failed with HTTP response code {sc}")
            );
        }
        let e = Failure::Http {
            status: 403,
            body: "denied".into(),
        }
        .to_esp_error();
        assert_eq!(e.message, "denied");
        let e = Failure::Invalid("x".into()).to_esp_error();
        assert_eq!(
            (e.http_status, e.code, e.message.as_str()),
            (500, 13, "Invalid response")
        );
        assert!(Failure::Http {
            status: 502,
            body: String::new()
        }
        .is_unavailable());
        assert!(!Failure::Http {
            status: 429,
            body: String::new()
        }
        .is_unavailable());
    }
}
