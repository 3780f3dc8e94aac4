//! Quota counters in Redis (`--redis-url`), for deployments where the database should not take
//! one write per allocation.
//!
//! This is storage, like the SQL counters beside it, so it obeys the store's layer rule (nothing
//! above `store` is imported). One Lua script applies a whole request: it reads every counter,
//! decides with the same rules as `apis::servicecontrol::quota::decide`, increments what was
//! granted and sets each key's expiry to the end of its window plus a grace period. Redis runs a
//! script atomically, so concurrent control planes neither over- nor under-admit. Keys carry a
//! hash tag (`{service|consumer}`) so one request's keys share a cluster slot.

use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use super::quota::{CounterError, CounterSpec, Grant, QuotaMode};

/// Kept after a window ends so a late, slow request still finds its counter.
const GRACE_MS: i64 = 60_000;

const SCRIPT: &str = r#"
local mode = ARGV[1]
local n = #KEYS
local used = {}
local limit = {}
local cost = {}
local ttl = {}
for i = 1, n do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  limit[i] = tonumber(ARGV[2 + (i - 1) * 3])
  cost[i] = tonumber(ARGV[3 + (i - 1) * 3])
  ttl[i] = tonumber(ARGV[4 + (i - 1) * 3])
end
local fits = {}
local all = true
for i = 1, n do
  fits[i] = (used[i] + cost[i] <= limit[i])
  if not fits[i] then all = false end
end
local out = {}
for i = 1, n do
  local g = 0
  if mode == 'NORMAL' then
    if all then g = cost[i] end
  elseif mode == 'BEST_EFFORT' then
    g = math.max(0, math.min(cost[i], limit[i] - used[i]))
  end
  if g > 0 then
    redis.call('INCRBY', KEYS[i], g)
    redis.call('PEXPIRE', KEYS[i], ttl[i])
  end
  out[2 * i - 1] = g
  out[2 * i] = fits[i] and 1 or 0
end
return out
"#;

#[derive(Clone)]
pub struct RedisCounters {
    client: redis::Client,
    /// One multiplexed connection shared by all requests; dropped after an I/O error so the
    /// next call reconnects (Redis restarted, network blip).
    conn: Arc<Mutex<Option<MultiplexedConnection>>>,
    script: redis::Script,
    prefix: String,
}

impl RedisCounters {
    /// `prefix` namespaces every key (tests use a fresh one per run).
    pub async fn connect(
        client: redis::Client,
        prefix: impl Into<String>,
    ) -> Result<RedisCounters, CounterError> {
        let rc = RedisCounters {
            client,
            conn: Arc::new(Mutex::new(None)),
            script: redis::Script::new(SCRIPT),
            prefix: prefix.into(),
        };
        // Connect now so a wrong --redis-url fails at start-up, not on the first request.
        rc.connection().await?;
        Ok(rc)
    }

    async fn connection(&self) -> Result<MultiplexedConnection, CounterError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = self.client.get_multiplexed_async_connection().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forgets the shared connection when an error means it may be broken.
    async fn on_error(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            *self.conn.lock().await = None;
        }
    }

    pub async fn allocate(
        &self,
        mode: QuotaMode,
        specs: &[CounterSpec],
        now_ms: i64,
    ) -> Result<Vec<Grant>, CounterError> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(mode.as_str());
        for s in specs {
            let end = s.window_start_ms.saturating_add(s.window_len_ms);
            let ttl = (end - now_ms).max(0) + GRACE_MS;
            inv.key(s.redis_key(&self.prefix));
            inv.arg(s.limit).arg(s.cost).arg(ttl);
        }
        let mut conn = self.connection().await?;
        let reply: Vec<i64> = match inv.invoke_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                self.on_error(&e).await;
                return Err(e.into());
            }
        };
        if reply.len() != specs.len() * 2 {
            return Err(CounterError::Reply(format!(
                "script returned {} values for {} counters",
                reply.len(),
                specs.len()
            )));
        }
        Ok(reply
            .chunks(2)
            .map(|c| Grant {
                granted: c[0],
                fits: c[1] == 1,
            })
            .collect())
    }

    /// Current usage of one counter (tests).
    pub async fn used(&self, s: &CounterSpec) -> Result<i64, CounterError> {
        let mut conn = self.connection().await?;
        let v: Option<i64> = redis::cmd("GET")
            .arg(s.redis_key(&self.prefix))
            .query_async(&mut conn)
            .await?;
        Ok(v.unwrap_or(0))
    }
}
