//! Spans received through the Cloud Trace API (`apis::cloudtrace`), one row per span, in one
//! shape whichever API version wrote them.
//!
//! Layer rule: SQL only. Ids arrive checked and normalised (lower-case hex), times as RFC 3339
//! text plus nanoseconds since the epoch for ordering; labels and the v2-only parts are JSON
//! text this module does not read.

use crate::store::{Migration, Store, StoreError};

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "trace_0001",
    sql: &[
        "CREATE TABLE IF NOT EXISTS trace_spans (\
         project_id TEXT NOT NULL, \
         trace_id TEXT NOT NULL, \
         span_id TEXT NOT NULL, \
         parent_span_id TEXT NOT NULL, \
         name TEXT NOT NULL, \
         kind TEXT NOT NULL, \
         start_time TEXT NOT NULL, \
         end_time TEXT NOT NULL, \
         start_ns BIGINT NOT NULL, \
         end_ns BIGINT NOT NULL, \
         labels TEXT NOT NULL, \
         extra TEXT NOT NULL, \
         written_at BIGINT NOT NULL, \
         PRIMARY KEY (project_id, trace_id, span_id))",
        "CREATE INDEX IF NOT EXISTS trace_spans_by_start ON trace_spans (project_id, start_ns)",
    ],
}];

/// One span as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSpan {
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// v1's kind (`RPC_SERVER`, `RPC_CLIENT`, `SPAN_KIND_UNSPECIFIED`).
    pub kind: String,
    pub start_time: String,
    pub end_time: String,
    pub start_ns: i64,
    pub end_ns: i64,
    /// JSON object of string labels.
    pub labels: String,
    /// JSON object: what a v2 span had beyond v1's fields (status, time events, links, the
    /// attribute types); `{}` for v1 spans.
    pub extra: String,
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    String,
);

fn from_row(r: Row) -> StoredSpan {
    StoredSpan {
        trace_id: r.0,
        span_id: r.1,
        parent_span_id: r.2,
        name: r.3,
        kind: r.4,
        start_time: r.5,
        end_time: r.6,
        start_ns: r.7,
        end_ns: r.8,
        labels: r.9,
        extra: r.10,
    }
}

const COLUMNS: &str = "trace_id, span_id, parent_span_id, name, kind, start_time, end_time, \
                       start_ns, end_ns, labels, extra";

/// Writes `spans` of `project_id` in one transaction. A span already stored (same trace and
/// span id) is replaced, as Cloud Trace v1 overwrites the fields it is sent again.
pub async fn put(
    store: &Store,
    project_id: &str,
    spans: &[StoredSpan],
    written_at: i64,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    for s in spans {
        sqlx::query(
            "INSERT INTO trace_spans (project_id, trace_id, span_id, parent_span_id, name, kind, \
             start_time, end_time, start_ns, end_ns, labels, extra, written_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (project_id, trace_id, span_id) DO UPDATE SET \
             parent_span_id = excluded.parent_span_id, name = excluded.name, \
             kind = excluded.kind, start_time = excluded.start_time, \
             end_time = excluded.end_time, start_ns = excluded.start_ns, \
             end_ns = excluded.end_ns, labels = excluded.labels, extra = excluded.extra, \
             written_at = excluded.written_at",
        )
        .bind(project_id)
        .bind(&s.trace_id)
        .bind(&s.span_id)
        .bind(&s.parent_span_id)
        .bind(&s.name)
        .bind(&s.kind)
        .bind(&s.start_time)
        .bind(&s.end_time)
        .bind(s.start_ns)
        .bind(s.end_ns)
        .bind(&s.labels)
        .bind(&s.extra)
        .bind(written_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Every span of one trace, by start time.
pub async fn trace(
    store: &Store,
    project_id: &str,
    trace_id: &str,
) -> Result<Vec<StoredSpan>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM trace_spans WHERE project_id = $1 AND trace_id = $2 \
         ORDER BY start_ns, span_id"
    ))
    .bind(project_id)
    .bind(trace_id)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// The spans of the newest `max_traces` traces (by their first span's start) whose first span
/// starts in `[from_ns, to_ns)`, grouped by trace in no particular order.
pub async fn recent(
    store: &Store,
    project_id: &str,
    from_ns: i64,
    to_ns: i64,
    max_traces: i64,
) -> Result<Vec<StoredSpan>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM trace_spans WHERE project_id = $1 AND trace_id IN (\
           SELECT trace_id FROM trace_spans WHERE project_id = $1 \
           GROUP BY trace_id HAVING MIN(start_ns) >= $2 AND MIN(start_ns) < $3 \
           ORDER BY MIN(start_ns) DESC LIMIT $4) \
         ORDER BY trace_id, start_ns, span_id"
    ))
    .bind(project_id)
    .bind(from_ns)
    .bind(to_ns)
    .bind(max_traces)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Drops what the retention bound no longer keeps: spans written before `written_before`, and
/// beyond the newest `max_spans` spans of the project (by start time). Returns how many went.
pub async fn prune(
    store: &Store,
    project_id: &str,
    written_before: i64,
    max_spans: i64,
) -> Result<u64, StoreError> {
    let mut tx = store.begin_write().await?;
    let old = sqlx::query("DELETE FROM trace_spans WHERE project_id = $1 AND written_at < $2")
        .bind(project_id)
        .bind(written_before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let over = sqlx::query(
        "DELETE FROM trace_spans WHERE project_id = $1 AND start_ns < (\
           SELECT start_ns FROM trace_spans WHERE project_id = $1 \
           ORDER BY start_ns DESC LIMIT 1 OFFSET $2)",
    )
    .bind(project_id)
    .bind(max_spans.saturating_sub(1).max(0))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(old + over)
}
