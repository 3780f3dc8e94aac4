//! Reads over `sc_logs` for the read API (writes are part of [`super::reports::write`]).

use super::reports::LogRow;
use crate::store::{Store, StoreError};

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

/// Entries matching `f`, newest first; each `entry` is the stored JSON text.
pub async fn recent(store: &Store, f: &LogFilter<'_>) -> Result<Vec<LogRow<String>>, StoreError> {
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
                LogRow {
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
