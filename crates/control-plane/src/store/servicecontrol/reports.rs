//! Service Control's report tables: the `:report` write path and retention.
//!
//! [`write()`] stores a whole `ReportRequest` in one transaction, after recording each
//! `operationId` in `sc_report_ops`; an operation whose id is already there is a replay (the
//! proxy retries reports) and is skipped, so nothing is double-counted. The transaction commits
//! before the handler answers 200, so accepted data survives a restart. [`prune`] applies
//! [`Retention`] to logs, rollups and remembered operation ids.
//!
//! The row types ([`RollupDelta`], [`LogRow`]) are defined here because their fields are the
//! tables' columns (the histogram has [`LATENCY_BUCKETS`] columns); turning reported operations
//! into them is the API's job (`apis::servicecontrol::report`).

use serde_json::Value;

use crate::store::{Store, StoreError};

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

/// One stored log entry. `E` is the entry: a JSON value on the way in, its stored text when
/// read back ([`super::logs::recent`]), so reads do not parse what they only pass on.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow<E = Value> {
    pub ts_ms: i64,
    pub method: String,
    pub consumer: String,
    pub status_code: i64,
    pub code_class: String,
    pub severity: String,
    pub operation_id: String,
    /// The entry as JSON, with API key material redacted.
    pub entry: E,
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
pub const ROWS_PER_STATEMENT: usize = 200;

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

/// What [`write()`] did.
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
) -> Result<WriteOutcome, StoreError> {
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
pub async fn prune(store: &Store, r: &Retention, now_ms: i64) -> Result<u64, StoreError> {
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
