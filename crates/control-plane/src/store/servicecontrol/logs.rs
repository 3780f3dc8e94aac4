//! Reads over `sc_logs` for the read API (writes are part of [`super::reports::write`]).

use crate::store::{Store, StoreError};

/// One stored entry; `entry` is the redacted `LogEntry` as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLog {
    pub ts_ms: i64,
    pub method: String,
    pub consumer: String,
    pub status_code: i64,
    pub code_class: String,
    pub severity: String,
    pub operation_id: String,
    pub entry: String,
}

/// Which entries to read; an empty `method`/`code_class`/`consumer` means all.
#[derive(Debug, Clone, Copy)]
pub struct LogFilter<'a> {
    pub service: &'a str,
    /// Inclusive, Unix milliseconds.
    pub since_ms: i64,
    pub method: &'a str,
    pub code_class: &'a str,
    pub consumer: &'a str,
    pub limit: i64,
}

/// ts_ms, method, consumer, status_code, code_class, severity, operation_id, entry.
type LogDbRow = (i64, String, String, i64, String, String, String, String);

/// Entries matching `f`, newest first.
pub async fn recent(store: &Store, f: &LogFilter<'_>) -> Result<Vec<StoredLog>, StoreError> {
    let rows: Vec<LogDbRow> = sqlx::query_as(
        "SELECT ts_ms, method, consumer, status_code, code_class, severity, operation_id, entry \
         FROM sc_logs WHERE service = $1 AND ts_ms >= $2 AND ($3 = '' OR method = $3) \
         AND ($4 = '' OR code_class = $4) AND ($5 = '' OR consumer = $5) \
         ORDER BY ts_ms DESC, id DESC LIMIT $6",
    )
    .bind(f.service)
    .bind(f.since_ms)
    .bind(f.method)
    .bind(f.code_class)
    .bind(f.consumer)
    .bind(f.limit)
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(ts_ms, method, consumer, status_code, code_class, severity, operation_id, entry)| {
                StoredLog {
                    ts_ms,
                    method,
                    consumer,
                    status_code,
                    code_class,
                    severity,
                    operation_id,
                    entry,
                }
            },
        )
        .collect())
}
