//! The Prometheus exposition (`GET /metrics`, text format).
//!
//! Two groups of series:
//! - traffic seen by proxies, from accepted `:report`s: `portico_api_requests_total`,
//!   `portico_api_errors_total` and `portico_api_latency_seconds_total` per service, method and
//!   response-code class (consumers are left out to bound cardinality; the rollups keep them);
//! - the control plane's own Service Control calls: `portico_servicecontrol_calls_total` per call
//!   (`check`, `allocateQuota`, `report`) and result, and `portico_servicecontrol_call_duration_seconds`.
//!
//! Counters are in memory and start from zero at process start, as Prometheus counters do; the
//! durable history is in the rollups.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::report::RollupDelta;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub service: String,
    pub method: String,
    pub code_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: String,
    /// `ok`, `denied` (check errors / exhausted quota / partial report), or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallKind {
    pub call: String,
}

type HistogramFamily = Family<CallKind, Histogram, fn() -> Histogram>;

pub struct ScMetrics {
    registry: Registry,
    api_requests: Family<ApiLabels, Counter>,
    api_errors: Family<ApiLabels, Counter>,
    api_latency: Family<ApiLabels, Counter<f64, AtomicU64>>,
    calls: Family<CallLabels, Counter>,
    call_duration: HistogramFamily,
}

fn call_histogram() -> Histogram {
    // 100 µs to ~1.6 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

impl Default for ScMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ScMetrics {
    pub fn new() -> ScMetrics {
        let mut registry = Registry::default();
        let api_requests = Family::<ApiLabels, Counter>::default();
        let api_errors = Family::<ApiLabels, Counter>::default();
        let api_latency = Family::<ApiLabels, Counter<f64, AtomicU64>>::default();
        let calls = Family::<CallLabels, Counter>::default();
        let call_duration: HistogramFamily = Family::new_with_constructor(call_histogram);
        registry.register(
            "portico_api_requests",
            "Requests reported by proxies, per service, method and response-code class",
            api_requests.clone(),
        );
        registry.register(
            "portico_api_errors",
            "Error responses (4xx/5xx) reported by proxies",
            api_errors.clone(),
        );
        registry.register(
            "portico_api_latency_seconds",
            "Sum of reported request latencies; divide by portico_api_requests_total for the mean",
            api_latency.clone(),
        );
        registry.register(
            "portico_servicecontrol_calls",
            "Service Control calls answered by this control plane",
            calls.clone(),
        );
        registry.register(
            "portico_servicecontrol_call_duration_seconds",
            "Time to answer a Service Control call",
            call_duration.clone(),
        );
        ScMetrics {
            registry,
            api_requests,
            api_errors,
            api_latency,
            calls,
            call_duration,
        }
    }

    /// Adds committed rollup deltas of `service`.
    pub fn record_deltas(&self, service: &str, deltas: &[RollupDelta]) {
        for d in deltas {
            let l = ApiLabels {
                service: service.to_string(),
                method: d.method.clone(),
                code_class: d.code_class.clone(),
            };
            if d.requests > 0 {
                self.api_requests
                    .get_or_create(&l)
                    .inc_by(d.requests.unsigned_abs());
            }
            if d.errors > 0 {
                self.api_errors
                    .get_or_create(&l)
                    .inc_by(d.errors.unsigned_abs());
            }
            if d.latency_sum_us > 0 {
                self.api_latency
                    .get_or_create(&l)
                    .inc_by(d.latency_sum_us as f64 / 1e6);
            }
        }
    }

    pub fn record_call(&self, call: &str, result: &str, seconds: f64) {
        self.calls
            .get_or_create(&CallLabels {
                call: call.to_string(),
                result: result.to_string(),
            })
            .inc();
        self.call_duration
            .get_or_create(&CallKind {
                call: call.to_string(),
            })
            .observe(seconds);
    }

    /// The text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_reported_traffic_and_calls() {
        let m = ScMetrics::new();
        m.record_deltas(
            "svc.example.com",
            &[RollupDelta {
                method: "1.api.Echo".into(),
                code_class: "5xx".into(),
                requests: 3,
                errors: 3,
                latency_sum_us: 1_500_000,
                ..Default::default()
            }],
        );
        m.record_call("check", "ok", 0.002);
        let text = m.encode().unwrap();
        assert!(text.contains(
            "portico_api_requests_total{service=\"svc.example.com\",method=\"1.api.Echo\",code_class=\"5xx\"} 3"
        ), "{text}");
        assert!(text.contains("portico_api_errors_total{"), "{text}");
        assert!(text.contains("portico_api_latency_seconds_total{service=\"svc.example.com\",method=\"1.api.Echo\",code_class=\"5xx\"} 1.5"), "{text}");
        assert!(
            text.contains("portico_servicecontrol_calls_total{call=\"check\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portico_servicecontrol_call_duration_seconds_count{call=\"check\"} 1"),
            "{text}"
        );
    }
}
