//! Prometheus metrics for `/metrics` on the status port. The registry is shared: other parts of
//! the proxy (the Service Control client) register their own metrics through
//! [`Metrics::register`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub service: String,
    pub config_id: String,
    pub rollout_id: String,
}

/// The proxy's metrics and the registry that exposes them.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Histogram,
    pub backend_latency: Histogram,
    pub config_in_use: Family<ConfigLabels, Gauge>,
    pub config_swaps: Counter,
    /// Client connections accepted on the serving ports.
    pub connections_accepted: Counter,
    /// Client connections open now.
    pub connections_active: Gauge,
    /// Requests between head received and response head sent.
    pub requests_in_flight: Gauge,
    total: std::sync::atomic::AtomicU64,
}

/// Methods become a fixed label set so a client cannot grow the label space.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 100 µs .. ~26 s, doubling.
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 19)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portico_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Histogram::new(latency_buckets());
        let backend_latency = Histogram::new(latency_buckets());
        let config_in_use = Family::<ConfigLabels, Gauge>::default();
        let config_swaps = Counter::default();
        let connections_accepted = Counter::default();
        let connections_active = Gauge::default();
        let requests_in_flight = Gauge::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted on the serving ports",
            connections_accepted.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now",
            connections_active.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests waiting for their response head",
            requests_in_flight.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by method and HTTP status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            latency.clone(),
        );
        registry.register(
            "backend_duration_seconds",
            "Time from forwarding to the backend's response head",
            backend_latency.clone(),
        );
        registry.register(
            "config",
            "Service configs in use (value = traffic percentage)",
            config_in_use.clone(),
        );
        registry.register(
            "config_swaps",
            "Routing tables swapped in",
            config_swaps.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            latency,
            backend_latency,
            config_in_use,
            config_swaps,
            connections_accepted,
            connections_active,
            requests_in_flight,
            total: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Registers another component's metric under the `portico_proxy_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// Requests answered since start (all ports but the status port).
    pub fn total_requests(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gives another component the registry itself (e.g. to register a family of metrics).
    pub fn with_registry(&self, f: impl FnOnce(&mut Registry)) {
        if let Ok(mut r) = self.registry.lock() {
            f(&mut r);
        }
    }

    pub fn observe_request(&self, method: &'static str, code: u16, total: Duration) {
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.requests
            .get_or_create(&RequestLabels { method, code })
            .inc();
        self.latency.observe(total.as_secs_f64());
    }

    /// Publishes the configs of the rollout now serving.
    pub fn set_configs(&self, service: &str, rollout_id: &str, configs: &[(String, u32)]) {
        self.config_in_use.clear();
        for (id, pct) in configs {
            self.config_in_use
                .get_or_create(&ConfigLabels {
                    service: service.to_string(),
                    config_id: id.clone(),
                    rollout_id: rollout_id.to_string(),
                })
                .set(i64::from(*pct));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let r = self.registry.lock().map_err(|_| std::fmt::Error)?;
        prometheus_client::encoding::text::encode(&mut out, &r)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_and_configs() {
        let m = Metrics::new();
        m.observe_request("GET", 404, Duration::from_millis(3));
        m.set_configs("svc", "r1", &[("c1".into(), 100)]);
        let text = m.encode().unwrap();
        assert!(
            text.contains("portico_proxy_requests_total{method=\"GET\",code=\"404\"} 1"),
            "{text}"
        );
        assert!(text.contains("config_id=\"c1\""), "{text}");
        assert!(
            text.contains("portico_proxy_request_duration_seconds_count 1"),
            "{text}"
        );
    }
}
