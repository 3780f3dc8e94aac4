//! `:report` ingestion: operations → per-minute rollups and stored log entries.
//!
//! [`extract`] is pure: it turns one reported operation into rollup deltas and log rows. The
//! store half writes a whole `ReportRequest` in one transaction, after recording each
//! `operationId` in `sc_report_ops`; an operation whose id is already there is a replay (the
//! proxy retries reports) and is skipped, so nothing is double-counted. The transaction commits
//! before the handler answers 200, so accepted data survives a restart.
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

use crate::store::Store;

/// Upper bounds (inclusive, milliseconds) of the stored latency histogram; one overflow bucket
/// follows.
pub const LATENCY_BOUNDS_MS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// One rollup row's increment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RollupDelta {
    pub minute_ms: i64,
    pub method: String,
    pub consumer: String,
    pub code_class: String,
    pub requests: i64,
    pub errors: i64,
    pub latency_sum_us: i64,
    pub latency_buckets: [i64; LATENCY_BUCKETS],
    pub request_bytes: i64,
    pub response_bytes: i64,
}

impl RollupDelta {
    fn key(&self) -> (i64, &str, &str, &str) {
        (
            self.minute_ms,
            &self.method,
            &self.consumer,
            &self.code_class,
        )
    }

    fn add(&mut self, o: &RollupDelta) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.latency_sum_us += o.latency_sum_us;
        for (a, b) in self
            .latency_buckets
            .iter_mut()
            .zip(o.latency_buckets.iter())
        {
            *a += *b;
        }
        self.request_bytes += o.request_bytes;
        self.response_bytes += o.response_bytes;
    }
}

/// One stored log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub ts_ms: i64,
    pub method: String,
    pub consumer: String,
    pub status_code: i64,
    pub code_class: String,
    pub severity: String,
    pub operation_id: String,
    /// The entry as JSON, with API key material redacted.
    pub entry: Value,
}

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

/// Merges deltas with equal keys (a batch often repeats a method/consumer/class).
pub fn merge_deltas(deltas: Vec<RollupDelta>) -> Vec<RollupDelta> {
    let mut index: std::collections::HashMap<(i64, String, String, String), usize> =
        std::collections::HashMap::new();
    let mut out: Vec<RollupDelta> = Vec::new();
    for d in deltas {
        let (m, a, b, c) = d.key();
        let key = (m, a.to_string(), b.to_string(), c.to_string());
        match index.get(&key) {
            Some(&i) => out[i].add(&d),
            None => {
                index.insert(key, out.len());
                out.push(d);
            }
        }
    }
    out
}

/// Rows per multi-row statement; keeps bind parameters far below both engines' limits.
const ROWS_PER_STATEMENT: usize = 200;

/// `INSERT INTO <head> VALUES (...), (...) <tail>` with `rows` groups of `cols` placeholders.
fn multi_row(head: &str, cols: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * cols * 5);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    let mut n = 1;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&n.to_string());
            n += 1;
        }
        sql.push(')');
    }
    sql.push(' ');
    sql.push_str(tail);
    sql
}

const OPS_HEAD: &str = "INSERT INTO sc_report_ops (service, operation_id, seen_at)";
const OPS_TAIL: &str = "ON CONFLICT (service, operation_id) DO NOTHING RETURNING operation_id";

const ROLLUP_HEAD: &str = "INSERT INTO sc_rollups (service, minute, method, consumer, \
     code_class, requests, errors, latency_sum_us, request_bytes, response_bytes, \
     lat_b0, lat_b1, lat_b2, lat_b3, lat_b4, lat_b5, lat_b6, lat_b7, lat_b8, lat_b9, lat_b10, \
     lat_b11, lat_b12, lat_b13)";
const ROLLUP_COLS: usize = 10 + LATENCY_BUCKETS;
const ROLLUP_TAIL: &str =
    "ON CONFLICT (service, minute, method, consumer, code_class) DO UPDATE SET \
     requests = sc_rollups.requests + excluded.requests, \
     errors = sc_rollups.errors + excluded.errors, \
     latency_sum_us = sc_rollups.latency_sum_us + excluded.latency_sum_us, \
     request_bytes = sc_rollups.request_bytes + excluded.request_bytes, \
     response_bytes = sc_rollups.response_bytes + excluded.response_bytes, \
     lat_b0 = sc_rollups.lat_b0 + excluded.lat_b0, lat_b1 = sc_rollups.lat_b1 + excluded.lat_b1, \
     lat_b2 = sc_rollups.lat_b2 + excluded.lat_b2, lat_b3 = sc_rollups.lat_b3 + excluded.lat_b3, \
     lat_b4 = sc_rollups.lat_b4 + excluded.lat_b4, lat_b5 = sc_rollups.lat_b5 + excluded.lat_b5, \
     lat_b6 = sc_rollups.lat_b6 + excluded.lat_b6, lat_b7 = sc_rollups.lat_b7 + excluded.lat_b7, \
     lat_b8 = sc_rollups.lat_b8 + excluded.lat_b8, lat_b9 = sc_rollups.lat_b9 + excluded.lat_b9, \
     lat_b10 = sc_rollups.lat_b10 + excluded.lat_b10, \
     lat_b11 = sc_rollups.lat_b11 + excluded.lat_b11, \
     lat_b12 = sc_rollups.lat_b12 + excluded.lat_b12, \
     lat_b13 = sc_rollups.lat_b13 + excluded.lat_b13";

const LOG_HEAD: &str = "INSERT INTO sc_logs (id, service, ts_ms, method, consumer, \
     status_code, code_class, severity, operation_id, entry)";
const LOG_COLS: usize = 10;

/// One operation ready to be written.
pub struct PreparedOp {
    pub operation_id: String,
    pub deltas: Vec<RollupDelta>,
    pub logs: Vec<LogRow>,
}

/// What [`write`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteOutcome {
    /// Operations applied (not replays).
    pub applied: usize,
    pub replayed: usize,
    /// Deltas that were applied, for the in-memory Prometheus counters.
    pub deltas: Vec<RollupDelta>,
}

/// Writes a batch in one transaction, with multi-row statements: the operation ids first
/// (`RETURNING` tells which are new, so replays are skipped), then the logs and the merged
/// rollups of the new operations. Every statement is a write, so on SQLite the transaction takes
/// the write lock at its first statement and never has to upgrade.
pub async fn write(
    store: &Store,
    service: &str,
    ops: Vec<PreparedOp>,
    now_ms: i64,
) -> Result<WriteOutcome, sqlx::Error> {
    let mut out = WriteOutcome::default();
    if ops.is_empty() {
        return Ok(out);
    }
    // The same id twice in one batch: the first occurrence counts, the rest are replays.
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::with_capacity(ops.len());
    for op in ops {
        if seen.insert(op.operation_id.clone()) {
            unique.push(op);
        } else {
            out.replayed += 1;
        }
    }
    let mut tx = store.begin_write().await?;
    let mut fresh = std::collections::HashSet::new();
    for chunk in unique.chunks(ROWS_PER_STATEMENT) {
        let sql = multi_row(OPS_HEAD, 3, chunk.len(), OPS_TAIL);
        let mut q = sqlx::query_as::<_, (String,)>(&sql);
        for op in chunk {
            q = q.bind(service).bind(&op.operation_id).bind(now_ms);
        }
        for (id,) in q.fetch_all(&mut *tx).await? {
            fresh.insert(id);
        }
    }
    let mut applied_deltas = Vec::new();
    let mut logs = Vec::new();
    for op in unique {
        if fresh.contains(&op.operation_id) {
            out.applied += 1;
            applied_deltas.extend(op.deltas);
            logs.extend(op.logs);
        } else {
            out.replayed += 1;
        }
    }
    for chunk in logs.chunks(ROWS_PER_STATEMENT) {
        let sql = multi_row(LOG_HEAD, LOG_COLS, chunk.len(), "");
        let mut q = sqlx::query(&sql);
        for l in chunk {
            q = q
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(service)
                .bind(l.ts_ms)
                .bind(&l.method)
                .bind(&l.consumer)
                .bind(l.status_code)
                .bind(&l.code_class)
                .bind(&l.severity)
                .bind(&l.operation_id)
                .bind(l.entry.to_string());
        }
        q.execute(&mut *tx).await?;
    }
    // Merged deltas have distinct keys, which a multi-row upsert on PostgreSQL requires.
    let merged = merge_deltas(applied_deltas);
    for chunk in merged.chunks(ROWS_PER_STATEMENT / 4) {
        let sql = multi_row(ROLLUP_HEAD, ROLLUP_COLS, chunk.len(), ROLLUP_TAIL);
        let mut q = sqlx::query(&sql);
        for d in chunk {
            q = q
                .bind(service)
                .bind(d.minute_ms)
                .bind(&d.method)
                .bind(&d.consumer)
                .bind(&d.code_class)
                .bind(d.requests)
                .bind(d.errors)
                .bind(d.latency_sum_us)
                .bind(d.request_bytes)
                .bind(d.response_bytes);
            for b in d.latency_buckets {
                q = q.bind(b);
            }
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    out.deltas = merged;
    Ok(out)
}

/// Retention bounds for stored logs and replay ids.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Logs older than this are deleted.
    pub log_max_age_ms: i64,
    /// At most this many log entries are kept per service (newest first).
    pub log_max_per_service: i64,
    /// How long an operation id is remembered for replay detection.
    pub op_id_max_age_ms: i64,
    /// Rollups older than this are deleted.
    pub rollup_max_age_ms: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            log_max_age_ms: 72 * 3_600_000,
            log_max_per_service: 10_000,
            op_id_max_age_ms: 24 * 3_600_000,
            rollup_max_age_ms: 30 * 24 * 3_600_000,
        }
    }
}

/// Applies [`Retention`]; returns the number of log rows deleted.
pub async fn prune(store: &Store, r: &Retention, now_ms: i64) -> Result<u64, sqlx::Error> {
    let mut deleted = sqlx::query("DELETE FROM sc_logs WHERE ts_ms < $1")
        .bind(now_ms - r.log_max_age_ms)
        .execute(store.pool())
        .await?
        .rows_affected();
    let services: Vec<(String,)> =
        sqlx::query_as("SELECT service FROM sc_logs GROUP BY service HAVING COUNT(*) > $1")
            .bind(r.log_max_per_service)
            .fetch_all(store.pool())
            .await?;
    for (svc,) in services {
        // The cut-off is the timestamp of the newest entry that falls outside the bound.
        let cutoff: Option<(i64,)> = sqlx::query_as(
            "SELECT ts_ms FROM sc_logs WHERE service = $1 ORDER BY ts_ms DESC, id DESC \
             LIMIT 1 OFFSET $2",
        )
        .bind(&svc)
        .bind(r.log_max_per_service)
        .fetch_optional(store.pool())
        .await?;
        if let Some((ts,)) = cutoff {
            deleted += sqlx::query("DELETE FROM sc_logs WHERE service = $1 AND ts_ms <= $2")
                .bind(&svc)
                .bind(ts)
                .execute(store.pool())
                .await?
                .rows_affected();
        }
    }
    sqlx::query("DELETE FROM sc_report_ops WHERE seen_at < $1")
        .bind(now_ms - r.op_id_max_age_ms)
        .execute(store.pool())
        .await?;
    sqlx::query("DELETE FROM sc_rollups WHERE minute < $1")
        .bind(now_ms - r.rollup_max_age_ms)
        .execute(store.pool())
        .await?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apis::servicecontrol::testutil;
    use portico_servicecontrol::{ExponentialBuckets, MetricValueSet};

    /// An operation shaped like ESP's: producer + consumer metrics, labels, one log entry.
    pub(crate) fn esp_operation(id: &str, code: i64, latency_s: f64) -> Operation {
        let class = code_class_of(code);
        let op_labels: BTreeMap<String, String> = [
            (labels::API_METHOD, "1.echo_api.Echo"),
            (labels::RESPONSE_CODE, &code.to_string()),
            (labels::RESPONSE_CODE_CLASS, &class),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // ESP's time distribution: 29 exponential buckets, growth 2, scale 1e-6 s.
        let mut buckets = vec![0i64; 31];
        let idx = (1..=29)
            .find(|i| latency_s < 1e-6 * 2f64.powi(*i))
            .unwrap_or(30) as usize;
        buckets[idx] = 1;
        let count = |name: &str, v: i64| MetricValueSet {
            metric_name: name.to_string(),
            metric_values: vec![MetricValue {
                int64_value: Some(v),
                ..Default::default()
            }],
        };
        Operation {
            operation_id: id.to_string(),
            operation_name: "1.echo_api.Echo".into(),
            consumer_id: "api_key:AIzaSECRETSECRETSECRET1234".into(),
            start_time: "2026-11-23T10:15:30.5Z".into(),
            end_time: "2026-11-23T10:15:30.6Z".into(),
            labels: op_labels,
            metric_value_sets: vec![
                count(metrics::PRODUCER_REQUEST_COUNT, 1),
                count(metrics::CONSUMER_REQUEST_COUNT, 1),
                count(
                    metrics::PRODUCER_ERROR_COUNT,
                    if code >= 400 { 1 } else { 0 },
                ),
                MetricValueSet {
                    metric_name: metrics::PRODUCER_TOTAL_LATENCIES.into(),
                    metric_values: vec![MetricValue {
                        distribution_value: Some(Distribution {
                            count: 1,
                            mean: latency_s,
                            minimum: latency_s,
                            maximum: latency_s,
                            bucket_counts: buckets,
                            exponential_buckets: Some(ExponentialBuckets {
                                num_finite_buckets: 29,
                                growth_factor: 2.0,
                                scale: 1e-6,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                },
            ],
            log_entries: vec![LogEntry {
                name: "endpoints_log".into(),
                timestamp: "2026-11-23T10:15:30.6Z".into(),
                severity: if code >= 400 { "ERROR" } else { "INFO" }.into(),
                struct_payload: Some(
                    serde_json::json!({
                        "api_key": "AIzaSECRETSECRETSECRET1234",
                        "url": "/echo?key=AIzaSECRETSECRETSECRET1234&x=1",
                        "http_response_code": code,
                        "api_method": "1.echo_api.Echo",
                        "log_message": "Method: 1.echo_api.Echo",
                    })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn extracts_counts_classes_latency_and_redacted_logs() {
        let op = esp_operation("op-1", 503, 0.030);
        let (deltas, logs) = extract(&op, "project_number:5", 0, &SecretParams::default());
        assert_eq!(deltas.len(), 1);
        let d = &deltas[0];
        assert_eq!(d.method, "1.echo_api.Echo");
        assert_eq!(d.code_class, "5xx");
        assert_eq!((d.requests, d.errors), (1, 1));
        assert_eq!(d.minute_ms, parse_time_ms("2026-11-23T10:15:00Z").unwrap());
        assert_eq!(d.latency_sum_us, 30_000);
        // 30 ms lies in ESP's bucket [16.4 ms, 32.8 ms); its midpoint 24.6 ms is in (10, 25].
        assert_eq!(d.latency_buckets[latency_bucket(24.6)], 1);
        assert_eq!(d.latency_buckets.iter().sum::<i64>(), 1);

        assert_eq!(logs.len(), 1);
        let l = &logs[0];
        assert_eq!((l.status_code, l.code_class.as_str()), (503, "5xx"));
        assert_eq!(l.severity, "ERROR");
        let text = l.entry.to_string();
        assert!(!text.contains("SECRETSECRET"), "key leaked: {text}");
        assert_eq!(l.entry["structPayload"]["api_key"], "…1234");
        assert_eq!(l.entry["structPayload"]["url"], "/echo?key=…1234&x=1");
    }

    #[test]
    fn error_count_derived_when_metric_missing_and_by_consumer_op_ignored() {
        let mut op = esp_operation("op-2", 404, 0.001);
        op.metric_value_sets
            .retain(|s| s.metric_name != metrics::PRODUCER_ERROR_COUNT);
        let (d, _) = extract(&op, "", 0, &SecretParams::default());
        assert_eq!(
            (d[0].requests, d[0].errors, d[0].code_class.as_str()),
            (1, 1, "4xx")
        );

        let by_consumer = Operation {
            operation_id: "op-21".into(),
            metric_value_sets: vec![MetricValueSet {
                metric_name: "serviceruntime.googleapis.com/api/producer/by_consumer/request_count"
                    .into(),
                metric_values: vec![MetricValue {
                    int64_value: Some(1),
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        assert!(extract(&by_consumer, "", 0, &SecretParams::default())
            .0
            .is_empty());
    }

    /// Every string of an entry is redacted, whatever field a client puts a URL in, with the
    /// service's own parameter names; members named like a secret are masked whole.
    #[test]
    fn stored_entries_hold_no_secret_anywhere() {
        let secret = "AIzaSECRETSECRETSECRET1234";
        let mut op = esp_operation("op-3", 404, 0.001);
        let entry = &mut op.log_entries[0];
        entry.labels.insert(
            labels::REFERER.into(),
            format!("https://app.example/page?KEY={secret}"),
        );
        entry.text_payload = Some(format!("GET /x;Api_Key={secret} HTTP/1.1"));
        if let Some(p) = entry.struct_payload.as_mut() {
            p.insert(
                "url".into(),
                format!("/a?%6Bey={secret}&myKey={secret}&x=1#access_token={secret}").into(),
            );
            p.insert(
                "log_message".into(),
                format!("Endpoints management skipped for an unrecognized HTTP call: GET /a?key={secret}").into(),
            );
            p.insert("nested".into(), serde_json::json!({"deep": [format!("?access_token={secret}")], "Access_Token": secret}));
        }
        let secrets = SecretParams::new(["mykey"]);
        let (_, logs) = extract(&op, "", 0, &secrets);
        let text = logs[0].entry.to_string();
        assert!(!text.contains("SECRETSECRET"), "secret stored: {text}");
        assert_eq!(
            logs[0].entry["structPayload"]["url"],
            "/a?%6Bey=…1234&myKey=…1234&x=1#access_token=…1234"
        );
        assert_eq!(
            logs[0].entry["structPayload"]["nested"]["Access_Token"],
            "…1234"
        );
        // Without the service's names, its custom parameter would be stored in clear.
        let (_, logs) = extract(&op, "", 0, &SecretParams::default());
        assert!(logs[0].entry.to_string().contains("myKey=AIzaSECRET"));
    }

    async fn rollup_requests(store: &Store, service: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM sc_rollups WHERE service = $1",
        )
        .bind(service)
        .fetch_one(store.pool())
        .await
        .expect("sum");
        n
    }

    fn prepared(op: &Operation) -> PreparedOp {
        let (deltas, logs) = extract(op, "project_number:5", 0, &SecretParams::default());
        PreparedOp {
            operation_id: op.operation_id.clone(),
            deltas,
            logs,
        }
    }

    async fn replays_are_not_double_counted(store: &Store) {
        let svc = "svc.example.com";
        let ops = vec![
            prepared(&esp_operation("a", 200, 0.002)),
            prepared(&esp_operation("b", 200, 0.004)),
        ];
        let first = write(store, svc, ops, 1_000).await.expect("write");
        assert_eq!((first.applied, first.replayed), (2, 0));
        assert_eq!(rollup_requests(store, svc).await, 2);
        // The proxy retried the batch, plus one new operation.
        let ops = vec![
            prepared(&esp_operation("a", 200, 0.002)),
            prepared(&esp_operation("b", 200, 0.004)),
            prepared(&esp_operation("c", 500, 0.004)),
        ];
        let second = write(store, svc, ops, 2_000).await.expect("write");
        assert_eq!((second.applied, second.replayed), (1, 2));
        assert_eq!(rollup_requests(store, svc).await, 3);
        // The same id twice within one batch counts once.
        let ops = vec![
            prepared(&esp_operation("d", 200, 0.002)),
            prepared(&esp_operation("d", 200, 0.002)),
        ];
        let third = write(store, svc, ops, 3_000).await.expect("write");
        assert_eq!((third.applied, third.replayed), (1, 1));
        assert_eq!(rollup_requests(store, svc).await, 4);
        let (logs,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sc_logs")
            .fetch_one(store.pool())
            .await
            .expect("count");
        assert_eq!(logs, 4);
    }

    #[tokio::test]
    async fn large_batches_span_several_statements() {
        let (_d, store) = testutil::sqlite_store().await;
        let mut ops = Vec::new();
        for i in 0..(ROWS_PER_STATEMENT * 2 + 7) {
            // Distinct methods give distinct rollup rows, so the rollup upsert is chunked too.
            let mut op = esp_operation(&format!("big{i}"), 200, 0.002);
            op.labels
                .insert(labels::API_METHOD.to_string(), format!("m{}", i % 120));
            ops.push(prepared(&op));
        }
        let n = ops.len() as i64;
        let out = write(&store, "s", ops, 1).await.expect("write");
        assert_eq!(out.applied as i64, n);
        assert_eq!(out.deltas.len(), 120);
        assert_eq!(rollup_requests(&store, "s").await, n);
    }

    #[tokio::test]
    async fn sqlite_report_idempotency() {
        let (_d, store) = testutil::sqlite_store().await;
        replays_are_not_double_counted(&store).await;
    }

    #[tokio::test]
    async fn postgres_report_idempotency() {
        let Some((schema, store)) = testutil::pg_store().await else {
            return;
        };
        replays_are_not_double_counted(&store).await;
        testutil::drop_pg_schema(&store, &schema).await;
    }

    #[tokio::test]
    async fn retention_bounds_logs() {
        let (_d, store) = testutil::sqlite_store().await;
        let base = parse_time_ms("2026-11-23T10:15:30.6Z").unwrap();
        let mut ops = Vec::new();
        for i in 0..10 {
            let mut op = esp_operation(&format!("op{i}"), 200, 0.001);
            op.log_entries[0].timestamp = format_time_ms(base + i * 1000);
            ops.push(prepared(&op));
        }
        write(&store, "s", ops, base).await.expect("write");
        let r = Retention {
            log_max_age_ms: 5_500,
            log_max_per_service: 3,
            ..Default::default()
        };
        // At base+10s: entries at base+0..4s are too old; of the remaining 5, only 3 are kept.
        let deleted = prune(&store, &r, base + 10_000).await.expect("prune");
        assert_eq!(deleted, 7);
        let kept: Vec<(i64,)> = sqlx::query_as("SELECT ts_ms FROM sc_logs ORDER BY ts_ms")
            .fetch_all(store.pool())
            .await
            .expect("rows");
        assert_eq!(
            kept.into_iter().map(|k| k.0 - base).collect::<Vec<_>>(),
            vec![7_000, 8_000, 9_000]
        );
    }
}
