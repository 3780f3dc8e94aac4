//! Quota counters in the control plane's database (SQLite embedded, or PostgreSQL shared by
//! several replicas).
//!
//! Each counter is one row, changed by a conditional upsert (`INSERT ... ON CONFLICT DO UPDATE
//! ... WHERE <fits> RETURNING`): one statement when the request touches a single counter, else
//! one transaction for all of them. The database itself decides admission: on PostgreSQL the
//! conflicting row is locked and the `WHERE` re-evaluated against its latest version, on SQLite
//! writers are serialised. A counter whose upsert returns no row did not fit; in `NORMAL` mode
//! the transaction is then rolled back so a denied allocation consumes nothing. Rows are touched
//! in a fixed order (`plan` sorts them) so concurrent transactions cannot deadlock.

use super::{CounterError, CounterSpec, Grant, QuotaMode};
use crate::store::{Backend, Store};

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
) -> Result<Grant, CounterError> {
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
    ) -> Result<Vec<Grant>, CounterError> {
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

    async fn check_only(&self, specs: &[CounterSpec]) -> Result<Vec<Grant>, CounterError> {
        let mut out = Vec::with_capacity(specs.len());
        for s in specs {
            let used: Option<(i64,)> = sqlx::query_as(SELECT_USED)
                .bind(&s.service)
                .bind(&s.limit_name)
                .bind(&s.consumer)
                .bind(s.window_start_ms)
                .fetch_optional(self.store.pool())
                .await?;
            let used = used.map(|u| u.0).unwrap_or(0);
            out.push(Grant {
                granted: 0,
                fits: used.saturating_add(s.cost) <= s.limit,
            });
        }
        Ok(out)
    }

    /// Deletes counters whose window has ended.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, CounterError> {
        let r = sqlx::query("DELETE FROM sc_quota_counters WHERE expires_at <= $1")
            .bind(now_ms)
            .execute(self.store.pool())
            .await?;
        Ok(r.rows_affected())
    }

    /// Current usage of one counter (tests and the query API).
    pub async fn used(&self, s: &CounterSpec) -> Result<i64, CounterError> {
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
