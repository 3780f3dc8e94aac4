//! Quota allocation for `services/{svc}:allocateQuota`.
//!
//! The limits come from the active service config's `quota.limits` (unit `1/min/{project}`,
//! `1/d/{project}`, ...; the amount in `values.STANDARD`); the costs come from the request's
//! `quotaMetrics` (the proxy derives them from `quota.metricRules`). Each (service, limit,
//! consumer, window) has one counter. Windows are fixed and aligned to the Unix epoch (a day is
//! a UTC day; Google uses Pacific time for daily quota, which Portico does not imitate), and the
//! window start comes from an injectable [`Clock`] so roll-over is testable.
//!
//! Modes follow Google's `QuotaMode`:
//! - `NORMAL`: all counters of the request get their full cost, or none does.
//! - `BEST_EFFORT` (what ESP sends): each counter gets as much of its cost as is still
//!   available; a counter that could not get its full cost yields `RESOURCE_EXHAUSTED`, so the
//!   proxy starts refusing, but what was available is consumed.
//! - `CHECK_ONLY`: nothing is consumed; errors say whether the cost would fit.
//!
//! This module decides (planning, [`decide`]); the counters themselves are storage and live in
//! [`crate::store::servicecontrol::quota`]: SQL (SQLite or PostgreSQL, through the shared
//! [`Store`](crate::store::Store)) or Redis (`--redis-url`), behind one [`Counters`]. Each
//! backend applies a whole request atomically, so several control-plane replicas admit exactly
//! `limit` units per window.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use portico_config::service::{QuotaLimit, Service};

pub use crate::store::servicecontrol::quota::{
    CounterError, CounterSpec, Counters, Grant, QuotaMode, SqlCounters,
};
pub use crate::store::servicecontrol::quota_redis::RedisCounters;

/// Milliseconds since the Unix epoch, from a replaceable source.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(ms)))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// A parsed limit unit: window length and whether the counter is per consumer project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub len_ms: i64,
    pub per_project: bool,
}

impl Window {
    /// Start of the window containing `now_ms`.
    pub fn start(&self, now_ms: i64) -> i64 {
        now_ms.div_euclid(self.len_ms) * self.len_ms
    }
}

/// Parses `1/min/{project}`-style units. Only rate limits are supported (a time unit is
/// required); Endpoints configs only produce `/min` and `/d`, `/s` and `/h` are accepted too.
pub fn parse_unit(unit: &str) -> Result<Window, String> {
    let parts: Vec<&str> = unit.trim().split('/').collect();
    let (num, rest) = match parts.split_first() {
        Some((n, rest)) => (*n, rest),
        None => return Err(format!("empty quota unit {unit:?}")),
    };
    if num != "1" {
        return Err(format!(
            "unsupported quota unit {unit:?}: expected it to start with \"1/\""
        ));
    }
    let mut len_ms = None;
    let mut per_project = false;
    for p in rest {
        match *p {
            "s" => len_ms = Some(1_000),
            "min" => len_ms = Some(60_000),
            "h" => len_ms = Some(3_600_000),
            "d" => len_ms = Some(86_400_000),
            "{project}" => per_project = true,
            other => {
                return Err(format!(
                    "unsupported quota unit {unit:?}: unknown component {other:?}"
                ))
            }
        }
    }
    match len_ms {
        Some(len_ms) => Ok(Window {
            len_ms,
            per_project,
        }),
        None => Err(format!(
            "unsupported quota unit {unit:?}: only rate limits (1/s, 1/min, 1/h, 1/d) are supported"
        )),
    }
}

/// The amount a limit allows per window; `None` means unlimited (`-1`).
pub fn limit_value(l: &QuotaLimit) -> Option<i64> {
    let v = l.values.get("STANDARD").copied().unwrap_or(l.default_limit);
    (v >= 0).then_some(v)
}

/// Why a request's quota could not be planned.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("quota metric {metric:?} has a negative cost ({cost})")]
    NegativeCost { metric: String, cost: i64 },
    #[error("quota metric {0:?} has no int64Value cost")]
    MissingCost(String),
    #[error("quota limit {limit:?} of service {service:?}: {reason}")]
    BadLimit {
        service: String,
        limit: String,
        reason: String,
    },
}

/// Turns the request's metric costs into counters under `config`'s limits at time `now_ms`.
///
/// A metric with no limit in the config is not limited (Google ignores such metrics too). A
/// limit whose unit Portico cannot interpret is an error rather than silently unlimited.
pub fn plan(
    config: &Service,
    consumer: &str,
    costs: &BTreeMap<String, i64>,
    now_ms: i64,
) -> Result<Vec<CounterSpec>, PlanError> {
    let Some(quota) = &config.quota else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (metric, &cost) in costs {
        if cost < 0 {
            return Err(PlanError::NegativeCost {
                metric: metric.clone(),
                cost,
            });
        }
        if cost == 0 {
            continue;
        }
        let metric_display = config
            .metrics
            .iter()
            .find(|m| &m.name == metric)
            .map(|m| m.display_name.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(metric)
            .to_string();
        for l in quota.limits.iter().filter(|l| &l.metric == metric) {
            let window = parse_unit(&l.unit).map_err(|reason| PlanError::BadLimit {
                service: config.name.clone(),
                limit: l.name.clone(),
                reason,
            })?;
            let Some(limit) = limit_value(l) else {
                continue;
            };
            out.push(CounterSpec {
                service: config.name.clone(),
                limit_name: l.name.clone(),
                consumer: if window.per_project {
                    consumer.to_string()
                } else {
                    String::new()
                },
                window_start_ms: window.start(now_ms),
                window_len_ms: window.len_ms,
                limit,
                cost,
                metric: metric.clone(),
                metric_display: metric_display.clone(),
                limit_display: if l.display_name.is_empty() {
                    l.name.clone()
                } else {
                    l.display_name.clone()
                },
            });
        }
    }
    // A fixed order means concurrent transactions lock rows in the same order (no deadlocks).
    out.sort();
    Ok(out)
}

/// Google's description for an exhausted limit (the proxy forwards it verbatim with 429).
pub fn exhausted_description(c: &CounterSpec, consumer: &str) -> String {
    format!(
        "Quota exceeded for quota metric '{}' and limit '{}' of service '{}' for consumer '{}'.",
        c.metric_display, c.limit_display, c.service, consumer
    )
}

/// Decides grants from the counters' current usage; shared by backends that read then write
/// under a lock (Redis's script does the same in Lua), and by the tests as the reference model.
pub fn decide(mode: QuotaMode, specs: &[CounterSpec], used: &[i64]) -> Vec<Grant> {
    let fits: Vec<bool> = specs
        .iter()
        .zip(used)
        .map(|(s, u)| u.saturating_add(s.cost) <= s.limit)
        .collect();
    match mode {
        QuotaMode::Normal => {
            let all = fits.iter().all(|f| *f);
            specs
                .iter()
                .zip(&fits)
                .map(|(s, f)| Grant {
                    granted: if all { s.cost } else { 0 },
                    fits: *f,
                })
                .collect()
        }
        QuotaMode::BestEffort => specs
            .iter()
            .zip(used)
            .zip(&fits)
            .map(|((s, u), f)| Grant {
                granted: s.cost.min((s.limit - u).max(0)),
                fits: *f,
            })
            .collect(),
        QuotaMode::CheckOnly => fits
            .iter()
            .map(|f| Grant {
                granted: 0,
                fits: *f,
            })
            .collect(),
    }
}
