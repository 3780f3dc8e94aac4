//! Backend retries, as Envoy's router makes them for ESPv2 (`--backend_retry_ons`,
//! `--backend_retry_num`, `--backend_per_try_timeout`, `--backend_retry_on_status_codes`): what
//! a failed attempt is ([`Failure`]), which conditions send the request again
//! ([`RetryOn`]), how long to wait first ([`backoff`]), and the cap on retries in flight per
//! backend ([`Retries::begin`]). The loop itself is the forwarder's
//! ([`crate::forward::Forwarder`]), which also decides whether a request *can* be sent again
//! (its body read whole and small enough to keep).
//!
//! Bounds, so that retries cannot multiply the load: a request is sent at most
//! `1 + --backend_retry_num` times; at most [`MAX_CONCURRENT_RETRIES`] retries per backend are
//! in flight at once (Envoy's default circuit breaker; past it a failure is answered, not
//! retried); the backend deadline (a rule's `deadline`, else 15 s) spans every attempt and the
//! waits between them.
//!
//! Layer rule: a leaf module (std, `http`, `rand`), read by [`crate::settings`] and
//! [`crate::forward`].

use http::HeaderMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The retry conditions Envoy knows (`x-envoy-retry-on` and `x-envoy-retry-grpc-on`), which
/// `--backend_retry_ons` takes.
pub const ENVOY_RETRY_ONS: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Envoy's default `max_retries` circuit breaker: retries in flight at once, per backend.
pub const MAX_CONCURRENT_RETRIES: usize = 3;

/// Envoy's retry back-off: the first wait is drawn below 25 ms, each next range doubles, up to
/// 250 ms.
const BACKOFF_BASE_MS: u64 = 25;
const BACKOFF_MAX_MS: u64 = 250;

/// Which failures and answers are retried. Built from `--backend_retry_ons` (Envoy's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub reset_before_request: bool,
    pub connect_failure: bool,
    pub envoy_ratelimited: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    /// gRPC statuses (`grpc-status` in the response head) retried, one bit per code.
    pub grpc_codes: u32,
}

/// Why an attempt got no response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, TLS handshake failed).
    ConnectFailure,
    /// The connection closed before any of the request was written.
    NotSent,
    /// The connection closed or reset after the request (or some of it) was written.
    Reset,
    /// An HTTP/2 backend refused the stream (`REFUSED_STREAM`): it did not process it.
    RefusedStream,
    /// `--backend_per_try_timeout` passed without a response head.
    PerTryTimeout,
}

/// gRPC codes for Envoy's gRPC retry names.
fn grpc_code(name: &str) -> Option<u32> {
    Some(match name {
        "cancelled" => 1,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

impl RetryOn {
    /// Parses a comma-separated list of Envoy's names (spaces around names and empty items are
    /// ignored; an empty list retries nothing). `Err` names the first unknown item.
    pub fn parse(list: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "reset-before-request" => on.reset_before_request = true,
                "connect-failure" => on.connect_failure = true,
                "envoy-ratelimited" => on.envoy_ratelimited = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => on.retriable_status_codes = true,
                // ESPv2 configures no retriable headers, and Portico speaks no HTTP/3: known,
                // accepted, never met.
                "retriable-headers" | "http3-post-connect-failure" => {}
                other => match grpc_code(other) {
                    Some(code) => on.grpc_codes |= 1 << code,
                    None => return Err(other.to_string()),
                },
            }
        }
        Ok(on)
    }

    /// Nothing is ever retried.
    pub fn is_empty(&self) -> bool {
        *self == RetryOn::default()
    }

    /// Some condition retries after the request was (or may have been) consumed, so its copy
    /// must be kept: everything but `connect-failure` alone.
    pub fn needs_replay(&self) -> bool {
        let connect_only = RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        };
        !self.is_empty() && *self != connect_only
    }

    /// Envoy's `wouldRetryFromReset`: the conditions that cover an attempt without a response
    /// head. `5xx`, `gateway-error` and `reset` cover every such failure, as a reset would
    /// become a 503.
    pub fn on_failure(&self, f: Failure) -> bool {
        let any_reset = self.reset || self.five_xx || self.gateway_error;
        match f {
            Failure::ConnectFailure => {
                self.connect_failure || self.reset_before_request || any_reset
            }
            Failure::NotSent => self.reset_before_request || any_reset,
            Failure::Reset | Failure::PerTryTimeout => any_reset,
            Failure::RefusedStream => self.refused_stream || any_reset,
        }
    }

    /// Envoy's `wouldRetryFromHeaders`: an answer from the backend retried for its status,
    /// its `grpc-status`, or Envoy's rate-limit header. Never an overloaded Envoy's answer.
    pub fn on_response(&self, status: u16, headers: &HeaderMap, codes: &[u16]) -> bool {
        if headers.contains_key("x-envoy-overloaded") {
            return false;
        }
        if headers.contains_key("x-envoy-ratelimited") {
            return self.envoy_ratelimited;
        }
        (self.five_xx && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || (self.retriable_status_codes && codes.contains(&status))
            || (self.grpc_codes != 0
                && headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .is_some_and(|c| c < 32 && self.grpc_codes & (1 << c) != 0))
    }
}

/// A backend's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Further attempts after the first, at most (`--backend_retry_num`).
    pub retries: u32,
    pub on: RetryOn,
    /// `--backend_retry_on_status_codes`, for `retriable-status-codes`.
    pub status_codes: Vec<u16>,
    /// `--backend_per_try_timeout`; `None`: each attempt may use what is left of the deadline.
    pub per_try_timeout: Option<Duration>,
}

impl RetryPolicy {
    /// Whether this policy can ever send a request again.
    pub fn retries_anything(&self) -> bool {
        self.retries > 0 && !self.on.is_empty()
    }
}

/// A backend's policy and the count of its retries in flight (shared by every serving thread
/// that calls the backend).
#[derive(Debug)]
pub struct Retries {
    pub policy: RetryPolicy,
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

impl Retries {
    pub fn new(policy: RetryPolicy) -> Arc<Retries> {
        Arc::new(Retries {
            policy,
            in_flight: AtomicUsize::new(0),
            max_in_flight: MAX_CONCURRENT_RETRIES,
        })
    }

    /// Takes one of the backend's retry slots for a retry about to wait and run; `None` when
    /// they are all taken (the failure is then answered). The slot is given back when the
    /// ticket drops, after the retried attempt.
    pub fn begin(self: &Arc<Self>) -> Option<RetryTicket> {
        let mut n = self.in_flight.load(Ordering::Relaxed);
        loop {
            if n >= self.max_in_flight {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(RetryTicket(self.clone())),
                Err(now) => n = now,
            }
        }
    }

    /// Retries in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One retry slot, held from the decision to retry until that attempt ends.
#[derive(Debug)]
pub struct RetryTicket(Arc<Retries>);

impl Drop for RetryTicket {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The wait before retry number `n` (1 for the first): drawn uniformly below 25 ms × 2ⁿ⁻¹,
/// capped at 250 ms, as Envoy's jittered exponential back-off.
pub fn backoff(n: u32) -> Duration {
    jittered_backoff(
        n,
        Duration::from_millis(BACKOFF_BASE_MS),
        Duration::from_millis(BACKOFF_MAX_MS),
    )
}

/// Envoy's jittered exponential back-off with a chosen base and cap: the wait before retry `n`
/// (1 for the first) is drawn uniformly below min(base × 2ⁿ⁻¹, max).
pub fn jittered_backoff(n: u32, base: Duration, max: Duration) -> Duration {
    use rand::Rng;
    let base = base.as_millis().max(1);
    let max = max.as_millis().max(base);
    let range = base
        .checked_shl(n.saturating_sub(1))
        .filter(|r| *r <= max)
        .unwrap_or(max);
    let range = u64::try_from(range).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..range))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn every_envoy_name_parses_and_others_are_named() {
        for name in ENVOY_RETRY_ONS {
            assert!(RetryOn::parse(name).is_ok(), "{name}");
        }
        assert_eq!(
            RetryOn::parse("reset, connect-failure,,5xx ").unwrap(),
            RetryOn {
                reset: true,
                connect_failure: true,
                five_xx: true,
                ..RetryOn::default()
            }
        );
        assert_eq!(RetryOn::parse("reset,sometimes"), Err("sometimes".into()));
        // Envoy's names are lower case.
        assert_eq!(RetryOn::parse("5XX"), Err("5XX".into()));
        assert!(RetryOn::parse("").unwrap().is_empty());
        assert!(RetryOn::parse(" , ").unwrap().is_empty());
        assert!(
            RetryOn::parse("retriable-headers,http3-post-connect-failure")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn failures_follow_envoys_rules() {
        let on = |s: &str| RetryOn::parse(s).unwrap();
        use Failure::*;
        let all = [ConnectFailure, NotSent, Reset, RefusedStream, PerTryTimeout];
        for name in ["5xx", "gateway-error", "reset"] {
            for f in all {
                assert!(on(name).on_failure(f), "{name} {f:?}");
            }
        }
        assert_eq!(
            all.map(|f| on("connect-failure").on_failure(f)),
            [true, false, false, false, false]
        );
        assert_eq!(
            all.map(|f| on("reset-before-request").on_failure(f)),
            [true, true, false, false, false]
        );
        assert_eq!(
            all.map(|f| on("refused-stream").on_failure(f)),
            [false, false, false, true, false]
        );
        assert_eq!(
            all.map(|f| on("retriable-4xx,unavailable").on_failure(f)),
            [false; 5]
        );
    }

    #[test]
    fn responses_follow_envoys_rules() {
        let on = |s: &str| RetryOn::parse(s).unwrap();
        let none = HeaderMap::new();
        let r = |o: RetryOn, status: u16| o.on_response(status, &none, &[418]);
        assert!(r(on("5xx"), 500) && r(on("5xx"), 599) && !r(on("5xx"), 499));
        assert!(r(on("gateway-error"), 503) && !r(on("gateway-error"), 500));
        assert!(r(on("retriable-4xx"), 409) && !r(on("retriable-4xx"), 404));
        assert!(r(on("retriable-status-codes"), 418) && !r(on("5xx"), 418));
        assert!(!r(on("reset,connect-failure,refused-stream"), 503));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(on("unavailable").on_response(200, &grpc, &[]));
        assert!(!on("internal").on_response(200, &grpc, &[]));
        grpc.insert("grpc-status", HeaderValue::from_static("99"));
        assert!(!on("unavailable").on_response(200, &grpc, &[]));
        let mut limited = HeaderMap::new();
        limited.insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
        assert!(!on("5xx").on_response(503, &limited, &[]));
        assert!(on("envoy-ratelimited").on_response(429, &limited, &[]));
        let mut overloaded = HeaderMap::new();
        overloaded.insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        assert!(!on("5xx,envoy-ratelimited").on_response(503, &overloaded, &[]));
    }

    #[test]
    fn replay_is_needed_unless_only_connections_are_retried() {
        let on = |s: &str| RetryOn::parse(s).unwrap();
        assert!(!on("connect-failure").needs_replay());
        assert!(!on("").needs_replay());
        assert!(on("connect-failure,reset").needs_replay());
        assert!(on("5xx").needs_replay());
    }

    #[test]
    fn retries_in_flight_are_capped_and_given_back() {
        let r = Retries::new(RetryPolicy {
            retries: 5,
            on: RetryOn::parse("5xx").unwrap(),
            status_codes: vec![],
            per_try_timeout: None,
        });
        let tickets: Vec<_> = (0..MAX_CONCURRENT_RETRIES)
            .map(|_| r.begin().expect("slot"))
            .collect();
        assert!(r.begin().is_none());
        assert_eq!(r.in_flight(), MAX_CONCURRENT_RETRIES);
        drop(tickets);
        assert_eq!(r.in_flight(), 0);
        assert!(r.begin().is_some());
    }

    #[test]
    fn backoff_ranges_grow_to_the_cap() {
        for _ in 0..200 {
            assert!(backoff(1) < Duration::from_millis(25));
            assert!(backoff(2) < Duration::from_millis(50));
            assert!(backoff(4) < Duration::from_millis(200));
            assert!(backoff(5) < Duration::from_millis(250));
            assert!(backoff(u32::MAX) < Duration::from_millis(250));
            let (base, max) = (Duration::from_millis(200), Duration::from_secs(32));
            assert!(jittered_backoff(1, base, max) < base);
            assert!(jittered_backoff(3, base, max) < Duration::from_millis(800));
            assert!(jittered_backoff(200, base, max) < max);
        }
        // A zero base still waits below 1 ms rather than panicking on an empty range.
        assert!(jittered_backoff(1, Duration::ZERO, Duration::ZERO) < Duration::from_millis(1));
    }
}
