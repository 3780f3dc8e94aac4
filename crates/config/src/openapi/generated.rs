//! The fixed parts of a generated config: the `endpoints_log` log, the `api` monitored resource
//! and the `serviceruntime.googleapis.com/api/{consumer,producer,producer/by_consumer}/*`
//! metrics, wired to producer and consumer destinations. ESP only reports logs and metrics that the config declares, so without these a
//! proxy would report nothing.

use crate::service::{
    LabelDescriptor, LogDescriptor, Logging, LoggingDestination, MetricDescriptor,
    MonitoredResourceDescriptor, Monitoring, MonitoringDestination,
};

pub const LOG_NAME: &str = "endpoints_log";
pub const MONITORED_RESOURCE: &str = "api";

fn label(key: &str) -> LabelDescriptor {
    LabelDescriptor {
        key: key.to_string(),
        ..Default::default()
    }
}

pub fn logs() -> Vec<LogDescriptor> {
    vec![LogDescriptor {
        name: LOG_NAME.to_string(),
        ..Default::default()
    }]
}

pub fn monitored_resources() -> Vec<MonitoredResourceDescriptor> {
    vec![MonitoredResourceDescriptor {
        resource_type: MONITORED_RESOURCE.to_string(),
        labels: [
            "cloud.googleapis.com/location",
            "cloud.googleapis.com/uid",
            "serviceruntime.googleapis.com/api_version",
            "serviceruntime.googleapis.com/api_method",
            "serviceruntime.googleapis.com/consumer_project",
            "cloud.googleapis.com/project",
            "cloud.googleapis.com/service",
        ]
        .into_iter()
        .map(label)
        .collect(),
    }]
}

/// (suffix, value type, unit)
const RUNTIME_METRICS: &[(&str, &str, &str)] = &[
    ("request_count", "INT64", "1"),
    ("error_count", "INT64", "1"),
    ("total_latencies", "DISTRIBUTION", "s"),
    ("request_overhead_latencies", "DISTRIBUTION", "s"),
    ("backend_latencies", "DISTRIBUTION", "s"),
    ("request_sizes", "DISTRIBUTION", "By"),
    ("response_sizes", "DISTRIBUTION", "By"),
];

/// DELTA totals of the bytes a request and its response moved. Declared in the producer and
/// consumer forms only, as Google's generated configs do: there is no by-consumer variant.
const BYTE_METRICS: &[&str] = &["request_bytes", "response_bytes"];

fn metric_name(side: &str, suffix: &str) -> String {
    format!("serviceruntime.googleapis.com/api/{side}/{suffix}")
}

pub fn metrics() -> Vec<MetricDescriptor> {
    let mut out = Vec::new();
    for side in ["consumer", "producer", "producer/by_consumer"] {
        for (suffix, value_type, unit) in RUNTIME_METRICS {
            let mut labels = vec![label("/protocol"), label("/response_code_class")];
            if *suffix == "request_count" || *suffix == "error_count" {
                labels.insert(0, label("/credential_id"));
                labels.push(label("/response_code"));
                labels.push(label("/status_code"));
            }
            out.push(MetricDescriptor {
                name: metric_name(side, suffix),
                labels,
                metric_kind: "DELTA".to_string(),
                value_type: value_type.to_string(),
                unit: unit.to_string(),
                ..Default::default()
            });
        }
    }
    for side in ["producer", "consumer"] {
        for suffix in BYTE_METRICS {
            out.push(MetricDescriptor {
                name: metric_name(side, suffix),
                metric_kind: "DELTA".to_string(),
                value_type: "INT64".to_string(),
                unit: "By".to_string(),
                ..Default::default()
            });
        }
    }
    out
}

/// ESP v1's metrics of streaming gRPC calls, which Google's compiler declares for gRPC
/// services (api-compiler's bookstore baseline): producer and consumer forms, DISTRIBUTION.
const STREAMING_METRICS: &[&str] = &[
    "streaming_request_message_counts",
    "streaming_response_message_counts",
    "streaming_durations",
];

/// The streaming metrics' descriptors ([`STREAMING_METRICS`]).
pub fn streaming_metrics() -> Vec<MetricDescriptor> {
    ["producer", "consumer"]
        .iter()
        .flat_map(|side| {
            STREAMING_METRICS
                .iter()
                .map(move |suffix| MetricDescriptor {
                    name: metric_name(side, suffix),
                    metric_kind: "DELTA".to_string(),
                    value_type: "DISTRIBUTION".to_string(),
                    ..Default::default()
                })
        })
        .collect()
}

/// Adds the streaming metrics to a [`monitoring`] section's producer and consumer
/// destinations.
pub fn add_streaming_monitoring(m: &mut Monitoring) {
    for (dests, side) in [
        (&mut m.producer_destinations, "producer"),
        (&mut m.consumer_destinations, "consumer"),
    ] {
        if let Some(d) = dests.first_mut() {
            d.metrics
                .extend(STREAMING_METRICS.iter().map(|s| metric_name(side, s)));
        }
    }
}

pub fn logging() -> Logging {
    Logging {
        producer_destinations: vec![LoggingDestination {
            monitored_resource: MONITORED_RESOURCE.to_string(),
            logs: vec![LOG_NAME.to_string()],
        }],
        consumer_destinations: Vec::new(),
    }
}

pub fn monitoring() -> Monitoring {
    let dest = |side: &str| MonitoringDestination {
        monitored_resource: MONITORED_RESOURCE.to_string(),
        metrics: RUNTIME_METRICS
            .iter()
            .map(|(suffix, _, _)| metric_name(side, suffix))
            .collect(),
    };
    let with_bytes = |side: &str| {
        let mut d = dest(side);
        d.metrics
            .extend(BYTE_METRICS.iter().map(|suffix| metric_name(side, suffix)));
        d
    };
    let mut producer = with_bytes("producer");
    // The by-consumer operation ESP appends when Service Control names the consumer project.
    producer
        .metrics
        .extend(dest("producer/by_consumer").metrics);
    Monitoring {
        producer_destinations: vec![producer],
        consumer_destinations: vec![with_bytes("consumer")],
    }
}
