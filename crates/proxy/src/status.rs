//! The status port (`--status_port`, default 8090), as ESP's second nginx server:
//!
//! - `GET|HEAD /endpoints_status`: JSON in the shape of ESP's status proto (lowerCamel names,
//!   64-bit numbers as strings), `serverVersion` `ESP/<the ESP release Portico follows>` so
//!   probes keyed on it keep working, Portico's own version in `porticoVersion`; other
//!   methods → 405;
//! - `/healthz`: 200, empty;
//! - `GET|HEAD /nginx_status`: nginx `stub_status` text (connections, requests);
//! - `GET /metrics`: Prometheus text (Portico addition);
//! - anything else: 404.

use crate::pipeline::{ProxyBody, ProxyState};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The ESP v1 release whose behaviour Portico reproduces, reported as `ESP/<this>`.
pub const ESP_VERSION: &str = "1.60.0";

/// Status-port state: when the process started (`startedAt`) and how many requests the status
/// port has answered (nginx counts those in `requests` too).
#[derive(Debug, Default)]
pub struct StatusInfo {
    pub started_at: String,
    pub requests: AtomicU64,
}

fn plain(status: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::empty());
    *r.status_mut() = status;
    r
}

/// Answers one status-port request.
pub fn handle<B>(
    state: &Arc<ProxyState>,
    info: &StatusInfo,
    req: &Request<B>,
) -> Response<ProxyBody> {
    info.requests.fetch_add(1, Ordering::Relaxed);
    let head = req.method() == Method::HEAD;
    let get_or_head = head || req.method() == Method::GET;
    match req.uri().path() {
        "/healthz" => plain(StatusCode::OK),
        "/nginx_status" => {
            if !get_or_head {
                return plain(StatusCode::METHOD_NOT_ALLOWED);
            }
            let c = connections(state, info);
            // nginx's stub_status text, so existing probes and scrapers keep working.
            let text = format!(
                "Active connections: {} \nserver accepts handled requests\n {} {} {} \nReading: {} Writing: {} Waiting: {} \n",
                c.active, c.accepted, c.accepted, c.requests, c.reading, c.writing, c.waiting
            );
            let mut r = Response::new(if head {
                ProxyBody::empty()
            } else {
                ProxyBody::full(text)
            });
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        "/endpoints_status" => {
            if !get_or_head {
                return plain(StatusCode::METHOD_NOT_ALLOWED);
            }
            let body =
                serde_json::to_string_pretty(&endpoints_status(state, info)).unwrap_or_default();
            let mut r = Response::new(if head {
                ProxyBody::empty()
            } else {
                ProxyBody::full(body + "\n")
            });
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        "/metrics" => {
            if !get_or_head {
                return plain(StatusCode::METHOD_NOT_ALLOWED);
            }
            match state.metrics.encode() {
                Ok(text) => {
                    let mut r = Response::new(if head {
                        ProxyBody::empty()
                    } else {
                        ProxyBody::full(text)
                    });
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR),
            }
        }
        _ => plain(StatusCode::NOT_FOUND),
    }
}

struct Connections {
    active: i64,
    accepted: u64,
    requests: u64,
    reading: i64,
    writing: i64,
    waiting: i64,
}

/// Connection counts in nginx's terms: `writing` = requests being processed, `waiting` = idle
/// keep-alive connections; request heads are parsed by hyper before Portico sees them, so
/// `reading` is always 0.
fn connections(state: &Arc<ProxyState>, info: &StatusInfo) -> Connections {
    let m = &state.metrics;
    let active = m.connections_active.get();
    let writing = m.requests_in_flight.get();
    Connections {
        active,
        accepted: m.connections_accepted.get(),
        requests: m
            .total_requests()
            .saturating_add(info.requests.load(Ordering::Relaxed)),
        reading: 0,
        writing,
        waiting: (active - writing).max(0),
    }
}

/// Values from `/proc/self/status` (Linux), in bytes.
fn proc_memory() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"), field("VmSize:"))
}

fn cpu_times_us() -> (i64, i64) {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return (0, 0);
    }
    let us = |tv: libc::timeval| tv.tv_sec * 1_000_000 + tv.tv_usec;
    (us(ru.ru_utime), us(ru.ru_stime))
}

/// proto3 JSON prints 64-bit integers as strings; the statistics arrive as numbers.
fn uint64_as_strings(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| match v {
                    Value::Number(n) => (k, Value::String(n.to_string())),
                    other => (k, other),
                })
                .collect(),
        ),
        other => other,
    }
}

/// The `/endpoints_status` document.
pub fn endpoints_status(state: &Arc<ProxyState>, info: &StatusInfo) -> Value {
    let table = state.routes.load();
    let mut percentages = Map::new();
    for (c, p) in &table.configs {
        percentages.insert(c.config_id.clone(), Value::String(p.to_string()));
    }
    let service_name = table
        .configs
        .first()
        .map(|(c, _)| c.service.name.clone())
        .unwrap_or_default();
    let stats = state
        .control
        .as_ref()
        .and_then(|c| c.statistics())
        .map(uint64_as_strings)
        .unwrap_or_else(|| {
            json!({
                "totalCalledChecks": "0", "sendChecksByFlush": "0", "sendChecksInFlight": "0",
                "totalCalledReports": "0", "sendReportsByFlush": "0", "sendReportsInFlight": "0",
                "sendReportOperations": "0", "maxReportSize": "0"
            })
        });
    let (rss, peak, vsize) = proc_memory();
    let (user_us, sys_us) = cpu_times_us();
    let c = connections(state, info);
    json!({
        "server": {
            "serverVersion": format!("ESP/{ESP_VERSION}"),
            "porticoVersion": env!("CARGO_PKG_VERSION"),
            "builtBy": env!("PORTICO_BUILT_BY"),
            "connections": {
                "active": c.active.to_string(),
                "accepted": c.accepted.to_string(),
                "handled": c.accepted.to_string(),
                "reading": c.reading.to_string(),
                "writing": c.writing.to_string(),
                "waiting": c.waiting.to_string(),
            },
            "requests": c.requests.to_string(),
        },
        "processes": [{
            "processId": std::process::id().to_string(),
            "startedAt": info.started_at,
            "memoryUsage": rss.to_string(),
            "userCpuTimeUs": user_us.to_string(),
            "systemCpuTimeUs": sys_us.to_string(),
            "espStatus": [{
                "serviceName": service_name,
                "serviceControlStatistics": stats,
                "serviceConfigRollouts": {
                    "rolloutId": table.rollout_id,
                    "percentages": percentages,
                },
            }],
            "peakMemoryUsage": peak.to_string(),
            "virtualSize": vsize.to_string(),
        }],
    })
}
