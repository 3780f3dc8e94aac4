//! Quota counters: the request-independent types ([`QuotaMode`], [`CounterSpec`], [`Grant`]),
//! the counters in the control plane's database ([`SqlCounters`]: SQLite embedded, or PostgreSQL
//! shared by several replicas), and [`Counters`], the choice between them and Redis
//! ([`super::quota_redis`]).
//!
//! Which counters a request touches and what a grant means is decided above, in
//! `apis::servicecontrol::quota` (`plan`, `decide`); a backend only applies a whole request
//! atomically, so several control-plane replicas admit exactly `limit` units per window.
//!
//! In SQL, each counter is one row, changed by a conditional upsert (`INSERT ... ON CONFLICT DO
//! UPDATE ... WHERE <fits> RETURNING`): one statement when the request touches a single counter,
//! else one transaction for all of them. The database itself decides admission: on PostgreSQL
//! the conflicting row is locked and the `WHERE` re-evaluated against its latest version, on
//! SQLite writers are serialised. A counter whose upsert returns no row did not fit; in `NORMAL`
//! mode the transaction is then rolled back so a denied allocation consumes nothing. Rows are
//! touched in a fixed order (`plan` sorts them) so concurrent transactions cannot deadlock.

use super::quota_redis::RedisCounters;
use crate::store::{Backend, Store, StoreError};

/// `NORMAL`, `BEST_EFFORT` or `CHECK_ONLY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    Normal,
    BestEffort,
    CheckOnly,
}

impl QuotaMode {
    /// An empty mode is `NORMAL`, Google's default (`UNSPECIFIED` behaves as `NORMAL` too).
    pub fn parse(s: &str) -> Option<QuotaMode> {
        match s {
            "" | "NORMAL" | "UNSPECIFIED" => Some(QuotaMode::Normal),
            "BEST_EFFORT" => Some(QuotaMode::BestEffort),
            "CHECK_ONLY" => Some(QuotaMode::CheckOnly),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaMode::Normal => "NORMAL",
            QuotaMode::BestEffort => "BEST_EFFORT",
            QuotaMode::CheckOnly => "CHECK_ONLY",
        }
    }
}

/// One counter touched by a request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CounterSpec {
    pub service: String,
    pub limit_name: String,
    /// `project_number:<n>`, or empty for a limit shared by all consumers.
    pub consumer: String,
    pub window_start_ms: i64,
    pub window_len_ms: i64,
    pub limit: i64,
    pub cost: i64,
    /// For the error text: the metric and limit display names.
    pub metric: String,
    pub metric_display: String,
    pub limit_display: String,
}

impl CounterSpec {
    /// A key that identifies the counter in Redis; the hash tag keeps one consumer's counters
    /// of a service in one cluster slot so the script may touch them together.
    pub fn redis_key(&self, prefix: &str) -> String {
        format!(
            "{prefix}quota:{{{}|{}}}:{}:{}",
            self.service, self.consumer, self.limit_name, self.window_start_ms
        )
    }
}

/// The result for one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Units consumed by this request (0 in `CHECK_ONLY`).
    pub granted: i64,
    /// Whether the full cost fitted.
    pub fits: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("quota counters: {0}")]
    Sql(#[from] StoreError),
    #[error("quota counters (redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("quota counters: unexpected reply: {0}")]
    Reply(String),
}

/// Where counters live.
#[derive(Clone)]
pub enum Counters {
    Sql(SqlCounters),
    Redis(RedisCounters),
}

impl Counters {
    /// Applies one request's counters atomically under `mode`.
    pub async fn allocate(
        &self,
        mode: QuotaMode,
        specs: &[CounterSpec],
        now_ms: i64,
    ) -> Result<Vec<Grant>, CounterError> {
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Counters::Sql(s) => Ok(s.allocate(mode, specs, now_ms).await?),
            Counters::Redis(r) => r.allocate(mode, specs, now_ms).await,
        }
    }

    /// Drops counters of windows that ended before `now_ms` (Redis expires its own keys).
    pub async fn prune(&self, now_ms: i64) -> Result<u64, CounterError> {
        match self {
            Counters::Sql(s) => Ok(s.prune(now_ms).await?),
            Counters::Redis(_) => Ok(0),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Counters::Sql(s) => s.kind(),
            Counters::Redis(_) => "redis",
        }
    }
}

#[derive(Clone)]
pub struct SqlCounters {
    store: Store,
}

const UPSERT_NORMAL: &str = "INSERT INTO sc_quota_counters \
     (service, limit_name, consumer, window_start, used, last_grant, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $5, $6) \
     ON CONFLICT (service, limit_name, consumer, window_start) DO UPDATE \
     SET used = sc_quota_counters.used + $5, last_grant = $5 \
     WHERE sc_quota_counters.used + $5 <= $7 \
     RETURNING used, last_grant";

// Both assignments see the row's old `used` (SQL evaluates SET expressions against the old row),
// so `last_grant` records exactly what this statement added.
const UPSERT_BEST_EFFORT: &str = "INSERT INTO sc_quota_counters \
     (service, limit_name, consumer, window_start, used, last_grant, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $5, $6) \
     ON CONFLICT (service, limit_name, consumer, window_start) DO UPDATE \
     SET used = sc_quota_counters.used + (CASE WHEN $7 - sc_quota_counters.used < $8 \
                THEN $7 - sc_quota_counters.used ELSE $8 END), \
         last_grant = (CASE WHEN $7 - sc_quota_counters.used < $8 \
                THEN $7 - sc_quota_counters.used ELSE $8 END) \
     WHERE sc_quota_counters.used < $7 \
     RETURNING used, last_grant";

const SELECT_USED: &str = "SELECT used FROM sc_quota_counters \
     WHERE service = $1 AND limit_name = $2 AND consumer = $3 AND window_start = $4";

/// Applies one counter's upsert (`NORMAL` or `BEST_EFFORT`) on `conn`.
async fn apply_one(
    conn: &mut sqlx::AnyConnection,
    mode: QuotaMode,
    s: &CounterSpec,
) -> Result<Grant, StoreError> {
    let denied = Grant {
        granted: 0,
        fits: false,
    };
    let (sql, initial) = match mode {
        QuotaMode::Normal if s.cost > s.limit => return Ok(denied),
        QuotaMode::BestEffort if s.limit <= 0 => return Ok(denied),
        QuotaMode::Normal => (UPSERT_NORMAL, s.cost),
        _ => (UPSERT_BEST_EFFORT, s.cost.min(s.limit)),
    };
    let row: Option<(i64, i64)> = sqlx::query_as(sql)
        .bind(&s.service)
        .bind(&s.limit_name)
        .bind(&s.consumer)
        .bind(s.window_start_ms)
        .bind(initial)
        .bind(s.window_start_ms.saturating_add(s.window_len_ms))
        .bind(s.limit)
        .bind(s.cost)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some((_used, granted)) => Grant {
            granted,
            fits: granted == s.cost,
        },
        None => denied,
    })
}

impl SqlCounters {
    pub fn new(store: Store) -> SqlCounters {
        SqlCounters { store }
    }

    pub fn kind(&self) -> &'static str {
        match self.store.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    pub async fn allocate(
        &self,
        mode: QuotaMode,
        specs: &[CounterSpec],
        _now_ms: i64,
    ) -> Result<Vec<Grant>, StoreError> {
        if mode == QuotaMode::CheckOnly {
            return self.check_only(specs).await;
        }
        if let [only] = specs {
            // One counter (the usual case): the conditional upsert alone is atomic, and without
            // BEGIN/COMMIT round trips the row lock is held for less time under contention.
            let mut conn = self.store.pool().acquire().await?;
            return Ok(vec![apply_one(&mut conn, mode, only).await?]);
        }
        let mut tx = self.store.begin_write().await?;
        let mut grants = Vec::with_capacity(specs.len());
        for s in specs {
            grants.push(apply_one(&mut tx, mode, s).await?);
        }
        if mode == QuotaMode::Normal && grants.iter().any(|g| !g.fits) {
            tx.rollback().await?;
            return Ok(grants
                .into_iter()
                .map(|g| Grant { granted: 0, ..g })
                .collect());
        }
        tx.commit().await?;
        Ok(grants)
    }

    async fn check_only(&self, specs: &[CounterSpec]) -> Result<Vec<Grant>, StoreError> {
        let mut out = Vec::with_capacity(specs.len());
        for s in specs {
            let used = self.used(s).await?;
            out.push(Grant {
                granted: 0,
                fits: used.saturating_add(s.cost) <= s.limit,
            });
        }
        Ok(out)
    }

    /// Deletes counters whose window has ended.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM sc_quota_counters WHERE expires_at <= $1")
            .bind(now_ms)
            .execute(self.store.pool())
            .await?;
        Ok(r.rows_affected())
    }

    /// Current usage of one counter (tests and the query API).
    pub async fn used(&self, s: &CounterSpec) -> Result<i64, StoreError> {
        let used: Option<(i64,)> = sqlx::query_as(SELECT_USED)
            .bind(&s.service)
            .bind(&s.limit_name)
            .bind(&s.consumer)
            .bind(s.window_start_ms)
            .fetch_optional(self.store.pool())
            .await?;
        Ok(used.map(|u| u.0).unwrap_or(0))
    }
}
