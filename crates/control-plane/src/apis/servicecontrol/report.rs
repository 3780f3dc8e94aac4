//! `:report` ingestion: operations → per-minute rollups and stored log entries.
//!
//! [`extract`] is pure: it turns one reported operation into rollup deltas and log rows.
//! [`crate::store::servicecontrol::reports`] writes them (replays skipped) and applies
//! [`Retention`]; its row types and histogram bounds are re-exported here.
//!
//! What is counted: `producer/request_count` (or `consumer/request_count` when the producer
//! metric is absent), `producer/error_count`, `producer/total_latencies` and the request/response
//! size distributions. ESP's extra by-consumer operation carries only `producer/by_consumer/*`
//! metrics and is therefore not counted twice.
//!
//! Latencies are folded into a fixed millisecond histogram ([`LATENCY_BOUNDS_MS`]): each bucket
//! of the incoming distribution contributes its count at the bucket's midpoint, which is exact
//! for counts and sums and approximate (within one bucket) for percentiles.

use std::borrow::Cow;
use std::collections::BTreeMap;

use portico_servicecontrol::redact::{mask_value, SecretParams};
use portico_servicecontrol::{labels, metrics, Distribution, LogEntry, MetricValue, Operation};
use serde_json::Value;

pub use crate::store::servicecontrol::reports::{
    LogRow, PreparedOp, Retention, RollupDelta, LATENCY_BOUNDS_MS, LATENCY_BUCKETS,
};

/// Parses RFC 3339 into Unix milliseconds.
pub fn parse_time_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Formats Unix milliseconds as RFC 3339 UTC.
pub fn format_time_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    crate::store::format_rfc3339(t)
}

/// `2xx`-style class of an HTTP status.
pub fn code_class_of(code: i64) -> String {
    if (100..600).contains(&code) {
        format!("{}xx", code / 100)
    } else {
        "unknown".to_string()
    }
}

fn label<'a>(
    value: &'a BTreeMap<String, String>,
    op: &'a BTreeMap<String, String>,
    key: &str,
) -> Option<&'a str> {
    value
        .get(key)
        .or_else(|| op.get(key))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn class_from_labels(value: &BTreeMap<String, String>, op: &BTreeMap<String, String>) -> String {
    if let Some(c) = label(value, op, labels::RESPONSE_CODE_CLASS) {
        return c.to_string();
    }
    label(value, op, labels::RESPONSE_CODE)
        .and_then(|c| c.parse::<i64>().ok())
        .map(code_class_of)
        .unwrap_or_else(|| "unknown".to_string())
}

/// The method an operation is about: the `api_method` label, else the operation name.
pub fn method_of(op: &Operation) -> String {
    op.labels
        .get(labels::API_METHOD)
        .filter(|m| !m.is_empty())
        .cloned()
        .unwrap_or_else(|| op.operation_name.clone())
}

/// Bucket index in the stored histogram for a latency in milliseconds.
pub fn latency_bucket(ms: f64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// Representative value (in the distribution's unit) of each bucket of `d`, underflow first.
fn bucket_midpoints(d: &Distribution) -> Option<Vec<f64>> {
    let bounds: Vec<f64> = if let Some(e) = &d.exponential_buckets {
        let n = usize::try_from(e.num_finite_buckets).ok()?;
        (0..=n)
            .map(|i| e.scale * e.growth_factor.powi(i as i32))
            .collect()
    } else if let Some(l) = &d.linear_buckets {
        let n = usize::try_from(l.num_finite_buckets).ok()?;
        (0..=n).map(|i| l.offset + l.width * i as f64).collect()
    } else if let Some(x) = &d.explicit_buckets {
        x.bounds.clone()
    } else {
        return None;
    };
    if bounds.is_empty() {
        return None;
    }
    // bounds[0] is the underflow's upper edge, bounds[last] the overflow's lower edge.
    let mut mids = Vec::with_capacity(bounds.len() + 1);
    mids.push(bounds[0] / 2.0);
    for w in bounds.windows(2) {
        mids.push((w[0] + w[1]) / 2.0);
    }
    mids.push(bounds[bounds.len() - 1]);
    Some(mids)
}

/// Folds a latency distribution (seconds) into the stored histogram and sum.
fn fold_latency(d: &Distribution, buckets: &mut [i64; LATENCY_BUCKETS], sum_us: &mut i64) {
    if d.count <= 0 {
        return;
    }
    *sum_us += (d.mean * d.count as f64 * 1e6).round() as i64;
    let placed = match bucket_midpoints(d) {
        Some(mids) if d.bucket_counts.len() == mids.len() => {
            for (c, mid) in d.bucket_counts.iter().zip(mids) {
                if *c > 0 {
                    buckets[latency_bucket(mid * 1000.0)] += *c;
                }
            }
            true
        }
        _ => false,
    };
    if !placed {
        // No usable buckets: the mean is the best single estimate.
        buckets[latency_bucket(d.mean * 1000.0)] += d.count;
    }
}

/// The rollup row (by response-code class) a metric value belongs to.
fn slot_of<'a>(
    m: &'a mut BTreeMap<String, RollupDelta>,
    proto: &RollupDelta,
    v: &MetricValue,
    op_labels: &BTreeMap<String, String>,
) -> &'a mut RollupDelta {
    let class = class_from_labels(&v.labels, op_labels);
    m.entry(class.clone()).or_insert_with(|| RollupDelta {
        code_class: class,
        ..proto.clone()
    })
}

fn int_value(v: &MetricValue) -> i64 {
    v.int64_value
        .or_else(|| v.distribution_value.as_ref().map(|d| d.count))
        .unwrap_or(0)
}

fn distribution_sum(v: &MetricValue) -> i64 {
    v.distribution_value
        .as_ref()
        .map(|d| (d.mean * d.count as f64).round() as i64)
        .or(v.int64_value)
        .unwrap_or(0)
}

/// Rollup deltas and log rows for one operation. `consumer` is already resolved (API key
/// strings never reach storage); `now_ms` is used when the operation carries no usable time;
/// `secrets` names the query parameters masked in the stored logs.
pub fn extract(
    op: &Operation,
    consumer: &str,
    now_ms: i64,
    secrets: &SecretParams,
) -> (Vec<RollupDelta>, Vec<LogRow>) {
    let method = method_of(op);
    let op_time = parse_time_ms(&op.end_time)
        .or_else(|| parse_time_ms(&op.start_time))
        .unwrap_or(now_ms);
    let minute = op_time.div_euclid(60_000) * 60_000;
    let proto = RollupDelta {
        minute_ms: minute,
        method: method.clone(),
        consumer: consumer.to_string(),
        ..Default::default()
    };

    let find = |name: &str| op.metric_value_sets.iter().find(|s| s.metric_name == name);
    let mut by_class: BTreeMap<String, RollupDelta> = BTreeMap::new();
    let request_set =
        find(metrics::PRODUCER_REQUEST_COUNT).or_else(|| find(metrics::CONSUMER_REQUEST_COUNT));
    if let Some(set) = request_set {
        for v in &set.metric_values {
            slot_of(&mut by_class, &proto, v, &op.labels).requests += int_value(v);
        }
        match find(metrics::PRODUCER_ERROR_COUNT) {
            Some(errs) => {
                for v in &errs.metric_values {
                    slot_of(&mut by_class, &proto, v, &op.labels).errors += int_value(v);
                }
            }
            None => {
                for d in by_class.values_mut() {
                    if d.code_class.starts_with('4') || d.code_class.starts_with('5') {
                        d.errors = d.requests;
                    }
                }
            }
        }
        if let Some(lat) = find(metrics::PRODUCER_TOTAL_LATENCIES) {
            for v in &lat.metric_values {
                if let Some(d) = &v.distribution_value {
                    let e = slot_of(&mut by_class, &proto, v, &op.labels);
                    fold_latency(d, &mut e.latency_buckets, &mut e.latency_sum_us);
                }
            }
        }
        if let Some(sz) = find(metrics::PRODUCER_REQUEST_SIZES) {
            for v in &sz.metric_values {
                slot_of(&mut by_class, &proto, v, &op.labels).request_bytes += distribution_sum(v);
            }
        }
        if let Some(sz) = find(metrics::PRODUCER_RESPONSE_SIZES) {
            for v in &sz.metric_values {
                slot_of(&mut by_class, &proto, v, &op.labels).response_bytes += distribution_sum(v);
            }
        }
    }
    let deltas: Vec<RollupDelta> = by_class.into_values().collect();

    let logs = op
        .log_entries
        .iter()
        .map(|e| log_row(op, e, &method, consumer, op_time, secrets))
        .collect();
    (deltas, logs)
}

fn log_row(
    op: &Operation,
    e: &LogEntry,
    method: &str,
    consumer: &str,
    op_time: i64,
    secrets: &SecretParams,
) -> LogRow {
    let payload = e.struct_payload.as_ref();
    let ts_ms = parse_time_ms(&e.timestamp)
        .or_else(|| {
            payload
                .and_then(|p| p.get("timestamp"))
                .and_then(Value::as_f64)
                .map(|s| (s * 1000.0) as i64)
        })
        .unwrap_or(op_time);
    let status_code = payload
        .and_then(|p| p.get("http_response_code"))
        .and_then(|v| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .or_else(|| {
            op.labels
                .get(labels::RESPONSE_CODE)
                .and_then(|c| c.parse().ok())
        })
        .unwrap_or(0);
    let method = payload
        .and_then(|p| p.get("api_method"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .unwrap_or(method)
        .to_string();
    let severity = if e.severity.is_empty() {
        if status_code >= 400 { "ERROR" } else { "INFO" }.to_string()
    } else {
        e.severity.clone()
    };
    let mut entry = serde_json::to_value(e).unwrap_or(Value::Null);
    redact_value(&mut entry, secrets);
    LogRow {
        ts_ms,
        method,
        consumer: consumer.to_string(),
        status_code,
        code_class: if status_code > 0 {
            code_class_of(status_code)
        } else {
            "unknown".to_string()
        },
        severity,
        operation_id: op.operation_id.clone(),
        entry,
    }
}

/// Credentials never reach storage. A member named like a secret parameter (the payload's
/// `api_key`) is masked whole; every other string — `url`, `log_message`, `referer`, labels, a
/// text payload, whatever a client puts there — has its secret query parameters masked by the
/// rule the proxy's access log uses ([`SecretParams::redact`]). serde_json bounds the nesting,
/// so the recursion is bounded too.
fn redact_value(v: &mut Value, secrets: &SecretParams) {
    match v {
        Value::String(s) => {
            if let Cow::Owned(r) = secrets.redact(s) {
                *s = r;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| redact_value(x, secrets)),
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match x {
                    Value::String(s) if secrets.is_secret_name(k) => *s = mask_value(s),
                    _ => redact_value(x, secrets),
                }
            }
        }
        _ => {}
    }
}
