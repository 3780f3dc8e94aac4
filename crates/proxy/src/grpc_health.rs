//! ESPv2's `--health_check_grpc_backend`: the proxy polls the gRPC backend's
//! `grpc.health.v1.Health/Check` and `--healthz` answers 503 while the backend is unhealthy.
//!
//! ESPv2 gets this from Envoy: its config generator puts a gRPC health check on the
//! `--backend` cluster (timeout and interval `--health_check_grpc_backend_interval`,
//! `no_traffic_interval` `--health_check_grpc_backend_no_traffic_interval`, healthy and
//! unhealthy thresholds 3, the request's `service` from
//! `--health_check_grpc_backend_service`), and its health-check filter answers `--healthz`
//! with `cluster_min_healthy_percentages` 100 for that cluster. What follows is how Envoy's
//! active health checker moves a host between the two states, kept here:
//!
//! - the host starts **unhealthy**, and the first check runs at once; a first success makes it
//!   healthy straight away;
//! - an answer that is not `SERVING` (another status, a gRPC error such as `UNIMPLEMENTED` from
//!   a backend without the Health service, an HTTP status other than 200) is an *active*
//!   failure: a healthy host is unhealthy at once;
//! - a network failure (no connection, reset, no answer within the interval) counts towards
//!   the unhealthy threshold: three in a row;
//! - an unhealthy host needs three successes in a row to be healthy again (except the first
//!   check's);
//! - the next check follows after the interval once the backend has carried traffic, and
//!   after the no-traffic interval until then (Envoy: the cluster has never opened a
//!   connection for a request; the checker's own connection does not count).
//!
//! The checker has its own client (its own connection, as Envoy's checker has), built like the
//! proxy's client for `--backend` (`grpc://` over h2c, `grpcs://` over TLS with ALPN `h2`).
//! Requests keep going to the backend while it is unhealthy: with one host, Envoy's panic
//! threshold routes to it anyway.

use crate::forward::{BackendProtocol, Forwarder, LimitedBody};
use crate::request_body::ReplayBody;
pub use crate::settings::HealthCheckSettings;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;
use prost::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// ESPv2's `--health_check_grpc_backend_interval` default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// ESPv2's `--health_check_grpc_backend_no_traffic_interval` default.
pub const DEFAULT_NO_TRAFFIC_INTERVAL: Duration = Duration::from_secs(60);
/// ESPv2's healthy and unhealthy thresholds.
pub const THRESHOLD: u32 = 3;
/// The path of the standard health service's check.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// The most of a health answer read: a `HealthCheckResponse` is a few bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; `status` 1 is `SERVING`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Serving,
    /// The backend answered, and not `SERVING`: unhealthy at once.
    Active(String),
    /// No answer: counts towards the unhealthy threshold.
    Network(String),
}

/// The backend's health as the serving threads read it, and whether it has carried traffic.
#[derive(Debug, Default)]
pub struct BackendHealth {
    healthy: AtomicBool,
    had_traffic: AtomicBool,
}

impl BackendHealth {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A request is going to `--backend`: from now on checks follow the (short) interval.
    pub fn note_traffic(&self) {
        // A load first: the store happens once, and the cache line stays shared after that.
        if !self.had_traffic.load(Ordering::Relaxed) {
            self.had_traffic.store(true, Ordering::Relaxed);
        }
    }

    fn had_traffic(&self) -> bool {
        self.had_traffic.load(Ordering::Relaxed)
    }
}

/// Envoy's per-host state machine ([module docs](self)).
#[derive(Debug)]
pub struct Tracker {
    healthy: bool,
    first: bool,
    successes: u32,
    network_failures: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            healthy: false,
            first: true,
            successes: 0,
            network_failures: 0,
        }
    }
}

impl Tracker {
    /// Takes one outcome; returns whether the host is healthy after it.
    pub fn record(&mut self, outcome: &Outcome) -> bool {
        let first = std::mem::replace(&mut self.first, false);
        match outcome {
            Outcome::Serving => {
                self.network_failures = 0;
                if !self.healthy {
                    self.successes += 1;
                    if first || self.successes >= THRESHOLD {
                        self.healthy = true;
                        self.successes = 0;
                    }
                }
            }
            Outcome::Active(_) => {
                self.successes = 0;
                self.network_failures = 0;
                self.healthy = false;
            }
            Outcome::Network(_) => {
                self.successes = 0;
                if self.healthy {
                    self.network_failures += 1;
                    if self.network_failures >= THRESHOLD {
                        self.healthy = false;
                        self.network_failures = 0;
                    }
                }
            }
        }
        self.healthy
    }
}

/// The checker: one `Health/Check` call at a time, for the life of the proxy.
pub struct Checker {
    client: Forwarder,
    settings: HealthCheckSettings,
    health: Arc<BackendHealth>,
}

impl Checker {
    pub fn new(
        client: Forwarder,
        settings: HealthCheckSettings,
        health: Arc<BackendHealth>,
    ) -> Self {
        Checker {
            client,
            settings,
            health,
        }
    }

    /// Checks until the task is dropped.
    pub async fn run(self) {
        let mut tracker = Tracker::default();
        let mut first = true;
        loop {
            let outcome = self.check().await;
            let was = self.health.is_healthy();
            let now = tracker.record(&outcome);
            self.health.healthy.store(now, Ordering::Relaxed);
            // The first check is said either way: an operator wants to know at start-up.
            if was != now || std::mem::take(&mut first) {
                if now {
                    tracing::info!("the gRPC backend is healthy");
                } else {
                    tracing::warn!(reason = ?outcome, "the gRPC backend is unhealthy");
                }
            } else {
                tracing::debug!(?outcome, healthy = now, "gRPC health check");
            }
            let wait = if self.health.had_traffic() {
                self.settings.interval
            } else {
                self.settings.no_traffic_interval
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One `Health/Check` call, bounded by the interval.
    pub async fn check(&self) -> Outcome {
        match tokio::time::timeout(self.settings.interval, self.call()).await {
            Ok(o) => o,
            Err(_) => Outcome::Network(format!("no answer within {:?}", self.settings.interval)),
        }
    }

    async fn call(&self) -> Outcome {
        let req = match self.request() {
            Ok(r) => r,
            Err(why) => return Outcome::Network(why),
        };
        let resp = match self
            .client
            .send_within(req, Some(self.settings.interval))
            .await
        {
            Ok(r) => r,
            Err(e) => return Outcome::Network(e.to_string()),
        };
        let (head, mut body) = resp.into_parts();
        if head.status != StatusCode::OK {
            return Outcome::Active(format!("HTTP status {}", head.status.as_u16()));
        }
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => return Outcome::Network(e.to_string()),
            };
            match frame.into_data() {
                Ok(d) => {
                    if data.len() + d.len() > MAX_ANSWER {
                        return Outcome::Active(format!("an answer over {MAX_ANSWER} bytes"));
                    }
                    data.extend_from_slice(&d);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        // Trailers-only answers carry the status in the head.
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u32>().ok());
        match status {
            Some(0) => {}
            Some(code) => return Outcome::Active(format!("grpc-status {code}")),
            None => return Outcome::Active("no grpc-status".into()),
        }
        parse_answer(data.freeze())
    }

    fn request(&self) -> Result<Request<LimitedBody>, String> {
        let message = HealthCheckRequest {
            service: self.settings.service.clone(),
        }
        .encode_to_vec();
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let uri = self
            .client
            .upstream_uri(CHECK_PATH)
            .map_err(|e| e.to_string())?;
        let body = LimitedBody::replay(ReplayBody {
            data: vec![Bytes::from(framed)],
            trailers: None,
        });
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        // Envoy's health checkers say who they are.
        h.insert(header::USER_AGENT, HeaderValue::from_static("Envoy/HC"));
        Ok(req)
    }
}

/// The `HealthCheckResponse` in a gRPC body: exactly one uncompressed message.
fn parse_answer(mut data: Bytes) -> Outcome {
    if data.len() < 5 {
        return Outcome::Active("no HealthCheckResponse".into());
    }
    let compressed = data.get_u8() != 0;
    let len = data.get_u32() as usize;
    if compressed {
        return Outcome::Active("a compressed HealthCheckResponse".into());
    }
    if data.len() != len {
        return Outcome::Active("a HealthCheckResponse of the wrong length".into());
    }
    match HealthCheckResponse::decode(data) {
        Ok(r) if r.status == SERVING => Outcome::Serving,
        Ok(r) => Outcome::Active(format!("status {}", r.status)),
        Err(e) => Outcome::Active(format!("not a HealthCheckResponse: {e}")),
    }
}

/// The checker's client for `backend`: its own connection, bounded by the interval.
pub fn client_for(
    backend: &crate::settings::BackendAddr,
    interval: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    net: &Arc<crate::backend_net::BackendNet>,
) -> Result<Forwarder, crate::forward::ForwarderBuildError> {
    Forwarder::with_net(
        backend,
        BackendProtocol::Unset,
        interval,
        tls,
        crate::upstream::PoolLimits::default(),
        net,
    )
    .map(Forwarder::without_cluster_limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(status: i32) -> Bytes {
        let m = HealthCheckResponse { status }.encode_to_vec();
        let mut v = vec![0];
        v.extend_from_slice(&(m.len() as u32).to_be_bytes());
        v.extend_from_slice(&m);
        Bytes::from(v)
    }

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(parse_answer(framed(1)), Outcome::Serving);
        assert_eq!(parse_answer(framed(2)), Outcome::Active("status 2".into()));
        // SERVING's default is UNKNOWN (0): an empty message is not serving.
        assert_eq!(parse_answer(framed(0)), Outcome::Active("status 0".into()));
        assert!(matches!(parse_answer(Bytes::new()), Outcome::Active(_)));
        let mut long = framed(1).to_vec();
        long.push(0);
        assert!(matches!(
            parse_answer(Bytes::from(long)),
            Outcome::Active(_)
        ));
        let mut compressed = framed(1).to_vec();
        compressed[0] = 1;
        assert!(matches!(
            parse_answer(Bytes::from(compressed)),
            Outcome::Active(_)
        ));
        assert!(matches!(
            parse_answer(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff])),
            Outcome::Active(_)
        ));
    }

    #[test]
    fn envoys_thresholds() {
        let net = || Outcome::Network("x".into());
        let bad = || Outcome::Active("x".into());
        // Unhealthy at first; the first success is enough.
        let mut t = Tracker::default();
        assert!(t.record(&Outcome::Serving));
        // An active failure is at once; coming back takes three successes.
        assert!(!t.record(&bad()));
        assert!(!t.record(&Outcome::Serving));
        assert!(!t.record(&Outcome::Serving));
        assert!(t.record(&Outcome::Serving));
        // Network failures take three in a row; a success in between starts over.
        assert!(t.record(&net()));
        assert!(t.record(&net()));
        assert!(t.record(&Outcome::Serving));
        assert!(t.record(&net()));
        assert!(t.record(&net()));
        assert!(!t.record(&net()));
        // A first check that fails leaves the host unhealthy, and then three are needed.
        let mut t = Tracker::default();
        assert!(!t.record(&net()));
        assert!(!t.record(&Outcome::Serving));
        assert!(!t.record(&Outcome::Serving));
        assert!(t.record(&Outcome::Serving));
    }
}
