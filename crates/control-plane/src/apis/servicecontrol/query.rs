//! Portico's read API over the rollups and logs (JSON), and `GET /metrics`.
//!
//! All under `/portico/v1/services/{service}/`; callers need the admin token or a principal with
//! `servicemanagement.services.get` on the service (serviceController, viewer, owner...).
//!
//! - `GET .../timeseries?method=&consumer=&startTime=&endTime=&since=&alignmentPeriod=`
//!   → `{"service", "alignmentPeriod", "timeSeries": [{"method", "points": [{"startTime",
//!   "endTime", "requestCount", "errorCount", "responseCodeClasses": {"2xx": n}, "latency":
//!   {"meanMs", "p50Ms", "p95Ms", "p99Ms", "bucketBoundsMs", "bucketCounts"}, "requestBytes",
//!   "responseBytes"}]}]}`. Points are oldest first; minutes without traffic are omitted.
//!   `alignmentPeriod` is `60s` (default) or any multiple of 60 s (`300s`, `5m`, `1h`).
//! - `GET .../topConsumers?since=&pageSize=` → `{"consumers": [{"consumer", "requestCount",
//!   "errorCount"}]}`, busiest first.
//! - `GET .../logs?method=&statusClass=&consumer=&since=&pageSize=` → `{"entries": [{"timestamp",
//!   "method", "consumer", "httpResponseCode", "responseCodeClass", "severity", "operationId",
//!   "logEntry"}]}`, newest first.
//!
//! Time parameters take RFC 3339 or a duration back from now (`90s`, `15m`, `2h`, `1d`); the
//! default window is the last hour. Percentiles are the upper bound of the histogram bucket that
//! contains them (the rollups keep a fixed histogram, see [`super::report::LATENCY_BOUNDS_MS`]).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use sqlx::Row;

use crate::app::AppState;
use crate::authz::{perms, require_service_permission, Principal};
use crate::error::ApiError;

/// Query parameters; empty values count as absent.
struct Params(std::collections::HashMap<String, String>);

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        Ok(Params(
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

use super::report::{format_time_ms, parse_time_ms, LATENCY_BOUNDS_MS, LATENCY_BUCKETS};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/portico/v1/services/{service}/timeseries", get(timeseries))
        .route(
            "/portico/v1/services/{service}/topConsumers",
            get(top_consumers),
        )
        .route("/portico/v1/services/{service}/logs", get(logs))
        .route("/metrics", get(metrics))
}

/// Parses `since`-style values: RFC 3339, or a duration back from `now_ms`.
pub fn parse_instant(v: &str, now_ms: i64) -> Option<i64> {
    if let Some(t) = parse_time_ms(v) {
        return Some(t);
    }
    parse_duration_ms(v).map(|d| now_ms - d)
}

/// `90s`, `15m`, `2h`, `1d` → milliseconds.
pub fn parse_duration_ms(v: &str) -> Option<i64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = v.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn bad_param(name: &str, v: &str, expected: &str) -> ApiError {
    ApiError::invalid_argument(format!("Invalid {name} '{v}': expected {expected}."))
        .with_field_violation(name, expected)
}

fn instant_param(p: &Params, name: &str, now: i64) -> Result<Option<i64>, ApiError> {
    match p.get(name) {
        None => Ok(None),
        Some(v) => parse_instant(v, now)
            .map(Some)
            .ok_or_else(|| bad_param(name, v, "RFC 3339 or a duration such as 15m")),
    }
}

fn size_param(p: &Params, default: i64, max: i64) -> Result<i64, ApiError> {
    match p.get("pageSize") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n > 0 => Ok(n.min(max)),
            _ => Err(bad_param("pageSize", v, "a positive integer")),
        },
    }
}

/// Authorisation shared by the read endpoints, then existence (admins get a clean 404).
async fn authorize(state: &AppState, principal: &Principal, service: &str) -> Result<(), ApiError> {
    require_service_permission(state, principal, service, perms::SERVICES_GET).await?;
    if crate::apis::servicemanagement::producer_project(state, service)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "Service '{service}' not found."
        )));
    }
    Ok(())
}

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

#[derive(Default)]
struct Point {
    requests: i64,
    errors: i64,
    latency_sum_us: i64,
    request_bytes: i64,
    response_bytes: i64,
    classes: BTreeMap<String, i64>,
    buckets: [i64; LATENCY_BUCKETS],
}

/// Upper bound (ms) of the bucket holding quantile `q`; the overflow bucket reports the last
/// finite bound.
pub fn percentile_ms(buckets: &[i64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: i64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut acc = 0;
    for (i, c) in buckets.iter().enumerate() {
        acc += c;
        if acc >= rank {
            return Some(LATENCY_BOUNDS_MS[i.min(LATENCY_BOUNDS_MS.len() - 1)]);
        }
    }
    LATENCY_BOUNDS_MS.last().copied()
}

async fn timeseries(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &principal, &service).await?;
    let now = state.servicecontrol.clock.now_ms();
    let end = instant_param(&params, "endTime", now)?.unwrap_or(now + 60_000);
    let start = match instant_param(&params, "startTime", now)? {
        Some(s) => s,
        None => instant_param(&params, "since", now)?.unwrap_or(now - 3_600_000),
    };
    let period = match params.get("alignmentPeriod") {
        None => 60_000,
        Some(v) => match parse_duration_ms(v) {
            Some(d) if d >= 60_000 && d % 60_000 == 0 => d,
            _ => {
                return Err(bad_param(
                    "alignmentPeriod",
                    v,
                    "a multiple of 60s, e.g. 60s or 5m",
                ))
            }
        },
    };
    let rows = sqlx::query(&TIMESERIES_SQL)
        .bind(&service)
        .bind(start)
        .bind(end)
        .bind(params.get("method").unwrap_or(""))
        .bind(params.get("consumer").unwrap_or(""))
        .fetch_all(state.store.pool())
        .await?;
    let mut series: BTreeMap<String, BTreeMap<i64, Point>> = BTreeMap::new();
    for r in rows {
        let minute: i64 = r.try_get(0)?;
        let method: String = r.try_get(1)?;
        let class: String = r.try_get(2)?;
        let aligned = minute.div_euclid(period) * period;
        let p = series
            .entry(method)
            .or_default()
            .entry(aligned)
            .or_default();
        let requests: i64 = r.try_get(3)?;
        p.requests += requests;
        p.errors += r.try_get::<i64, _>(4)?;
        p.latency_sum_us += r.try_get::<i64, _>(5)?;
        p.request_bytes += r.try_get::<i64, _>(6)?;
        p.response_bytes += r.try_get::<i64, _>(7)?;
        *p.classes.entry(class).or_insert(0) += requests;
        for i in 0..LATENCY_BUCKETS {
            p.buckets[i] += r.try_get::<i64, _>(8 + i)?;
        }
    }
    let time_series: Vec<Value> = series
        .into_iter()
        .map(|(method, points)| {
            let points: Vec<Value> = points
                .into_iter()
                .map(|(t, p)| {
                    let observed: i64 = p.buckets.iter().sum();
                    json!({
                        "startTime": format_time_ms(t),
                        "endTime": format_time_ms(t + period),
                        "requestCount": p.requests.to_string(),
                        "errorCount": p.errors.to_string(),
                        "responseCodeClasses": p.classes.iter()
                            .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
                            .collect::<serde_json::Map<_, _>>(),
                        "latency": {
                            "meanMs": if observed > 0 {
                                Some(p.latency_sum_us as f64 / 1000.0 / observed as f64)
                            } else { None },
                            "p50Ms": percentile_ms(&p.buckets, 0.5),
                            "p95Ms": percentile_ms(&p.buckets, 0.95),
                            "p99Ms": percentile_ms(&p.buckets, 0.99),
                            "bucketBoundsMs": LATENCY_BOUNDS_MS,
                            "bucketCounts": p.buckets.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                        },
                        "requestBytes": p.request_bytes.to_string(),
                        "responseBytes": p.response_bytes.to_string(),
                    })
                })
                .collect();
            json!({"method": method, "points": points})
        })
        .collect();
    Ok(Json(json!({
        "service": service,
        "alignmentPeriod": format!("{}s", period / 1000),
        "timeSeries": time_series,
    })))
}

async fn top_consumers(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &principal, &service).await?;
    let now = state.servicecontrol.clock.now_ms();
    let since = instant_param(&params, "since", now)?.unwrap_or(now - 3_600_000);
    let limit = size_param(&params, 10, 100)?;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT consumer, CAST(SUM(requests) AS BIGINT), CAST(SUM(errors) AS BIGINT) \
         FROM sc_rollups WHERE service = $1 AND minute >= $2 \
         GROUP BY consumer ORDER BY 2 DESC, consumer LIMIT $3",
    )
    .bind(&service)
    .bind(since.div_euclid(60_000) * 60_000)
    .bind(limit)
    .fetch_all(state.store.pool())
    .await?;
    let consumers: Vec<Value> = rows
        .into_iter()
        .map(|(c, r, e)| {
            json!({"consumer": c, "requestCount": r.to_string(), "errorCount": e.to_string()})
        })
        .collect();
    Ok(Json(json!({ "consumers": consumers })))
}

/// ts_ms, method, consumer, status_code, code_class, severity, operation_id, entry.
type LogDbRow = (i64, String, String, i64, String, String, String, String);

async fn logs(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &principal, &service).await?;
    let now = state.servicecontrol.clock.now_ms();
    let since = instant_param(&params, "since", now)?.unwrap_or(now - 3_600_000);
    let limit = size_param(&params, 50, 1000)?;
    let class = params.get("statusClass").unwrap_or("");
    if !class.is_empty() && !matches!(class, "1xx" | "2xx" | "3xx" | "4xx" | "5xx") {
        return Err(bad_param(
            "statusClass",
            class,
            "one of 1xx, 2xx, 3xx, 4xx, 5xx",
        ));
    }
    let rows: Vec<LogDbRow> = sqlx::query_as(
        "SELECT ts_ms, method, consumer, status_code, code_class, severity, operation_id, entry \
         FROM sc_logs WHERE service = $1 AND ts_ms >= $2 AND ($3 = '' OR method = $3) \
         AND ($4 = '' OR code_class = $4) AND ($5 = '' OR consumer = $5) \
         ORDER BY ts_ms DESC, id DESC LIMIT $6",
    )
    .bind(&service)
    .bind(since)
    .bind(params.get("method").unwrap_or(""))
    .bind(class)
    .bind(params.get("consumer").unwrap_or(""))
    .bind(limit)
    .fetch_all(state.store.pool())
    .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for (ts, method, consumer, code, cls, severity, op_id, entry) in rows {
        entries.push(json!({
            "timestamp": format_time_ms(ts),
            "method": method,
            "consumer": consumer,
            "httpResponseCode": code,
            "responseCodeClass": cls,
            "severity": severity,
            "operationId": op_id,
            "logEntry": serde_json::from_str::<Value>(&entry)?,
        }));
    }
    Ok(Json(json!({ "entries": entries })))
}

/// Prometheus scrapes are unauthenticated, as is usual; the listener is loopback by default and
/// the series carry service and method names only.
async fn metrics(State(state): State<AppState>) -> Response {
    match state.servicecontrol.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format_args!("encoding metrics: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_instants() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("15m"), Some(900_000));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("m"), None);
        assert_eq!(parse_duration_ms("5w"), None);
        assert_eq!(parse_instant("1h", 10_000_000), Some(6_400_000));
        assert_eq!(parse_instant("1970-01-01T00:00:01Z", 0), Some(1_000));
    }

    #[test]
    fn percentiles_from_buckets() {
        let mut b = [0i64; LATENCY_BUCKETS];
        assert_eq!(percentile_ms(&b, 0.5), None);
        b[1] = 90; // (1, 2] ms
        b[6] = 9; // (50, 100] ms
        b[LATENCY_BUCKETS - 1] = 1; // > 10 s
        assert_eq!(percentile_ms(&b, 0.5), Some(2.0));
        assert_eq!(percentile_ms(&b, 0.95), Some(100.0));
        assert_eq!(percentile_ms(&b, 0.999), Some(10000.0));
    }
}
