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

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use crate::app::{AppState, Params};
use crate::authz::{perms, require_service_permission, Principal};
use crate::error::ApiError;
use crate::store::servicecontrol::logs::{self as stored_logs, LogFilter};
use crate::store::servicecontrol::rollups::{self, MinuteFilter};

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

/// The window the read endpoints look back over when no time is given.
const DEFAULT_WINDOW_MS: i64 = 3_600_000;

/// Authorisation shared by the read endpoints, then existence (admins get a clean 404); returns
/// the current time on Service Control's clock.
async fn authorize(
    state: &AppState,
    principal: &Principal,
    service: &str,
) -> Result<i64, ApiError> {
    require_service_permission(state, principal, service, perms::SERVICES_GET).await?;
    super::producer_of(state, service).await?;
    Ok(state.servicecontrol.clock.now_ms())
}

/// `since`, or the default window back from `now`.
fn since_param(p: &Params, now: i64) -> Result<i64, ApiError> {
    Ok(instant_param(p, "since", now)?.unwrap_or(now - DEFAULT_WINDOW_MS))
}

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

/// `GET .../timeseries`. Counts are int64, hence strings (proto3 JSON).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TimeSeriesResponse {
    service: String,
    alignment_period: String,
    time_series: Vec<MethodSeries>,
}

#[derive(Serialize)]
struct MethodSeries {
    method: String,
    points: Vec<PointOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PointOut {
    start_time: String,
    end_time: String,
    request_count: String,
    error_count: String,
    response_code_classes: BTreeMap<String, String>,
    latency: LatencyOut,
    request_bytes: String,
    response_bytes: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LatencyOut {
    mean_ms: Option<f64>,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    p99_ms: Option<f64>,
    bucket_bounds_ms: &'static [f64],
    bucket_counts: Vec<String>,
}

impl PointOut {
    fn new(start_ms: i64, period_ms: i64, p: Point) -> PointOut {
        let observed: i64 = p.buckets.iter().sum();
        PointOut {
            start_time: format_time_ms(start_ms),
            end_time: format_time_ms(start_ms + period_ms),
            request_count: p.requests.to_string(),
            error_count: p.errors.to_string(),
            response_code_classes: p
                .classes
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            latency: LatencyOut {
                mean_ms: (observed > 0).then(|| p.latency_sum_us as f64 / 1000.0 / observed as f64),
                p50_ms: percentile_ms(&p.buckets, 0.5),
                p95_ms: percentile_ms(&p.buckets, 0.95),
                p99_ms: percentile_ms(&p.buckets, 0.99),
                bucket_bounds_ms: &LATENCY_BOUNDS_MS,
                bucket_counts: p.buckets.iter().map(|c| c.to_string()).collect(),
            },
            request_bytes: p.request_bytes.to_string(),
            response_bytes: p.response_bytes.to_string(),
        }
    }
}

async fn timeseries(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<TimeSeriesResponse>, ApiError> {
    let now = authorize(&state, &principal, &service).await?;
    let end = instant_param(&params, "endTime", now)?.unwrap_or(now + 60_000);
    let start = match instant_param(&params, "startTime", now)? {
        Some(s) => s,
        None => since_param(&params, now)?,
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
    let rows = rollups::minutes(
        &state.store,
        &MinuteFilter {
            service: &service,
            start_ms: start,
            end_ms: end,
            method: params.get("method").unwrap_or(""),
            consumer: params.get("consumer").unwrap_or(""),
        },
    )
    .await?;
    let mut series: BTreeMap<String, BTreeMap<i64, Point>> = BTreeMap::new();
    for r in rows {
        let aligned = r.minute_ms.div_euclid(period) * period;
        let p = series
            .entry(r.method)
            .or_default()
            .entry(aligned)
            .or_default();
        p.requests += r.requests;
        p.errors += r.errors;
        p.latency_sum_us += r.latency_sum_us;
        p.request_bytes += r.request_bytes;
        p.response_bytes += r.response_bytes;
        *p.classes.entry(r.code_class).or_insert(0) += r.requests;
        for (sum, b) in p.buckets.iter_mut().zip(r.latency_buckets) {
            *sum += b;
        }
    }
    let time_series = series
        .into_iter()
        .map(|(method, points)| MethodSeries {
            method,
            points: points
                .into_iter()
                .map(|(t, p)| PointOut::new(t, period, p))
                .collect(),
        })
        .collect();
    Ok(Json(TimeSeriesResponse {
        service,
        alignment_period: format!("{}s", period / 1000),
        time_series,
    }))
}

/// `GET .../topConsumers`.
#[derive(Serialize)]
struct TopConsumersResponse {
    consumers: Vec<ConsumerOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConsumerOut {
    consumer: String,
    request_count: String,
    error_count: String,
}

async fn top_consumers(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<TopConsumersResponse>, ApiError> {
    let now = authorize(&state, &principal, &service).await?;
    let since = since_param(&params, now)?;
    let limit = size_param(&params, 10, 100)?;
    let rows = rollups::top_consumers(
        &state.store,
        &service,
        since.div_euclid(60_000) * 60_000,
        limit,
    )
    .await?;
    let consumers = rows
        .into_iter()
        .map(|c| ConsumerOut {
            consumer: c.consumer,
            request_count: c.requests.to_string(),
            error_count: c.errors.to_string(),
        })
        .collect();
    Ok(Json(TopConsumersResponse { consumers }))
}

/// `GET .../logs`.
#[derive(Serialize)]
struct LogsResponse {
    entries: Vec<LogOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LogOut {
    timestamp: String,
    method: String,
    consumer: String,
    http_response_code: i64,
    response_code_class: String,
    severity: String,
    operation_id: String,
    log_entry: Value,
}

async fn logs(
    State(state): State<AppState>,
    principal: Principal,
    Path(service): Path<String>,
    params: Params,
) -> Result<Json<LogsResponse>, ApiError> {
    let now = authorize(&state, &principal, &service).await?;
    let since = since_param(&params, now)?;
    let limit = size_param(&params, 50, 1000)?;
    let class = params.get("statusClass").unwrap_or("");
    if !class.is_empty() && !matches!(class, "1xx" | "2xx" | "3xx" | "4xx" | "5xx") {
        return Err(bad_param(
            "statusClass",
            class,
            "one of 1xx, 2xx, 3xx, 4xx, 5xx",
        ));
    }
    let rows = stored_logs::recent(
        &state.store,
        &LogFilter {
            service: &service,
            since_ms: since,
            method: params.get("method").unwrap_or(""),
            code_class: class,
            consumer: params.get("consumer").unwrap_or(""),
            limit,
        },
    )
    .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for r in rows {
        entries.push(LogOut {
            timestamp: format_time_ms(r.ts_ms),
            method: r.method,
            consumer: r.consumer,
            http_response_code: r.status_code,
            response_code_class: r.code_class,
            severity: r.severity,
            operation_id: r.operation_id,
            log_entry: serde_json::from_str(&r.entry)?,
        });
    }
    Ok(Json(LogsResponse { entries }))
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
