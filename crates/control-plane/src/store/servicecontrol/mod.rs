//! Service Control's tables (all prefixed `sc_`) and every statement that touches them.
//!
//! - [`reports`]: the `:report` write path (`sc_report_ops` for replay detection, `sc_rollups`,
//!   `sc_logs`) in one transaction, and retention.
//! - [`rollups`] and [`logs`]: the read API's queries over `sc_rollups` and `sc_logs`.
//! - [`quota`]: quota counters, in `sc_quota_counters` ([`quota::SqlCounters`]) or in Redis
//!   ([`quota_redis::RedisCounters`]), behind one [`quota::Counters`].
//! - [`lookups`]: the few reads Service Control makes of other APIs' tables (projects, rollouts,
//!   configs).
//!
//! Layer rule: like the rest of `store`, nothing here imports `crate::apis`, `crate::app`,
//! `crate::authz` or `crate::error`; functions take a [`Store`](super::Store) and return
//! [`StoreError`](super::StoreError) (or [`quota::CounterError`], which wraps it).
//!
//! Tables: `sc_quota_counters` (one row per limit/consumer/window), `sc_report_ops` (operation
//! ids seen, for idempotent `:report`), `sc_rollups` (per minute, service, method, consumer and
//! response-code class: counts, errors, latency histogram, bytes) and `sc_logs` (redacted
//! `endpoints_log` entries, bounded by [`reports::Retention`]).

pub mod logs;
pub mod lookups;
pub mod quota;
pub mod quota_redis;
pub mod reports;
pub mod rollups;

use super::Migration;

pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "sc_0001",
    sql: &[
        "CREATE TABLE IF NOT EXISTS sc_quota_counters (\
         service TEXT NOT NULL, \
         limit_name TEXT NOT NULL, \
         consumer TEXT NOT NULL, \
         window_start BIGINT NOT NULL, \
         used BIGINT NOT NULL, \
         last_grant BIGINT NOT NULL, \
         expires_at BIGINT NOT NULL, \
         PRIMARY KEY (service, limit_name, consumer, window_start))",
        "CREATE INDEX IF NOT EXISTS sc_quota_counters_expiry ON sc_quota_counters (expires_at)",
        "CREATE TABLE IF NOT EXISTS sc_report_ops (\
         service TEXT NOT NULL, \
         operation_id TEXT NOT NULL, \
         seen_at BIGINT NOT NULL, \
         PRIMARY KEY (service, operation_id))",
        "CREATE INDEX IF NOT EXISTS sc_report_ops_seen ON sc_report_ops (seen_at)",
        "CREATE TABLE IF NOT EXISTS sc_rollups (\
         service TEXT NOT NULL, \
         minute BIGINT NOT NULL, \
         method TEXT NOT NULL, \
         consumer TEXT NOT NULL, \
         code_class TEXT NOT NULL, \
         requests BIGINT NOT NULL, \
         errors BIGINT NOT NULL, \
         latency_sum_us BIGINT NOT NULL, \
         request_bytes BIGINT NOT NULL, \
         response_bytes BIGINT NOT NULL, \
         lat_b0 BIGINT NOT NULL, lat_b1 BIGINT NOT NULL, lat_b2 BIGINT NOT NULL, \
         lat_b3 BIGINT NOT NULL, lat_b4 BIGINT NOT NULL, lat_b5 BIGINT NOT NULL, \
         lat_b6 BIGINT NOT NULL, lat_b7 BIGINT NOT NULL, lat_b8 BIGINT NOT NULL, \
         lat_b9 BIGINT NOT NULL, lat_b10 BIGINT NOT NULL, lat_b11 BIGINT NOT NULL, \
         lat_b12 BIGINT NOT NULL, lat_b13 BIGINT NOT NULL, \
         PRIMARY KEY (service, minute, method, consumer, code_class))",
        "CREATE TABLE IF NOT EXISTS sc_logs (\
         id TEXT PRIMARY KEY, \
         service TEXT NOT NULL, \
         ts_ms BIGINT NOT NULL, \
         method TEXT NOT NULL, \
         consumer TEXT NOT NULL, \
         status_code BIGINT NOT NULL, \
         code_class TEXT NOT NULL, \
         severity TEXT NOT NULL, \
         operation_id TEXT NOT NULL, \
         entry TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS sc_logs_service_ts ON sc_logs (service, ts_ms)",
    ],
}];
