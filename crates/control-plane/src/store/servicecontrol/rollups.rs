//! Reads over `sc_rollups` for the read API: per-minute sums and the busiest consumers.

use std::sync::LazyLock;

use sqlx::Row;

use super::reports::LATENCY_BUCKETS;
use crate::store::{Store, StoreError};

static TIMESERIES_SQL: LazyLock<String> = LazyLock::new(|| {
    let buckets: Vec<String> = (0..LATENCY_BUCKETS)
        .map(|i| format!("CAST(SUM(lat_b{i}) AS BIGINT)"))
        .collect();
    format!(
        "SELECT minute, method, code_class, CAST(SUM(requests) AS BIGINT), \
         CAST(SUM(errors) AS BIGINT), CAST(SUM(latency_sum_us) AS BIGINT), \
         CAST(SUM(request_bytes) AS BIGINT), CAST(SUM(response_bytes) AS BIGINT), {} \
         FROM sc_rollups WHERE service = $1 AND minute >= $2 AND minute < $3 \
         AND ($4 = '' OR method = $4) AND ($5 = '' OR consumer = $5) \
         GROUP BY minute, method, code_class ORDER BY minute",
        buckets.join(", ")
    )
});

/// One minute of one method and response-code class, summed over consumers.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteRow {
    pub minute_ms: i64,
    pub method: String,
    pub code_class: String,
    pub requests: i64,
    pub errors: i64,
    pub latency_sum_us: i64,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub latency_buckets: [i64; LATENCY_BUCKETS],
}

/// Which rollups to read; an empty `method`/`consumer` means all.
#[derive(Debug, Clone, Copy)]
pub struct MinuteFilter<'a> {
    pub service: &'a str,
    /// Inclusive.
    pub start_ms: i64,
    /// Exclusive.
    pub end_ms: i64,
    pub method: &'a str,
    pub consumer: &'a str,
}

/// Rows of `f`'s window, oldest minute first.
pub async fn minutes(store: &Store, f: &MinuteFilter<'_>) -> Result<Vec<MinuteRow>, StoreError> {
    let rows = sqlx::query(&TIMESERIES_SQL)
        .bind(f.service)
        .bind(f.start_ms)
        .bind(f.end_ms)
        .bind(f.method)
        .bind(f.consumer)
        .fetch_all(store.pool())
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let mut latency_buckets = [0i64; LATENCY_BUCKETS];
        for (i, b) in latency_buckets.iter_mut().enumerate() {
            *b = r.try_get(8 + i)?;
        }
        out.push(MinuteRow {
            minute_ms: r.try_get(0)?,
            method: r.try_get(1)?,
            code_class: r.try_get(2)?,
            requests: r.try_get(3)?,
            errors: r.try_get(4)?,
            latency_sum_us: r.try_get(5)?,
            request_bytes: r.try_get(6)?,
            response_bytes: r.try_get(7)?,
            latency_buckets,
        });
    }
    Ok(out)
}

/// A consumer's totals over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerTotals {
    pub consumer: String,
    pub requests: i64,
    pub errors: i64,
}

/// The `limit` busiest consumers of `service` from minute `since_minute_ms` on, busiest first.
pub async fn top_consumers(
    store: &Store,
    service: &str,
    since_minute_ms: i64,
    limit: i64,
) -> Result<Vec<ConsumerTotals>, StoreError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT consumer, CAST(SUM(requests) AS BIGINT), CAST(SUM(errors) AS BIGINT) \
         FROM sc_rollups WHERE service = $1 AND minute >= $2 \
         GROUP BY consumer ORDER BY 2 DESC, consumer LIMIT $3",
    )
    .bind(service)
    .bind(since_minute_ms)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(consumer, requests, errors)| ConsumerTotals {
            consumer,
            requests,
            errors,
        })
        .collect())
}
