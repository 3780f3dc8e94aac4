//! The `sm_services` table: managed services, their producer project, IAM policy, deletion
//! flag, and the per-service counters that number operations, configs and rollouts.
//!
//! Layer rule: storage only; imports nothing above `store`. Policies are stored and returned as
//! JSON text: the policy model lives in `authz`, above this layer.
//!
//! Config and rollout ids are `YYYY-MM-DDrN`, N counting per service per UTC day from 0. The
//! counters live on the service row, and every writer of a service updates that row first: this
//! serialises the writers of one service on both databases (see [`super`] on `begin_write`).

use sqlx::AnyConnection;

use super::{now_rfc3339, Migration, Store, StoreError};

/// The schema of Service Management: `sm_0001` created the config and rollout tables in the same
/// migration as the service table, and shipped migrations are never split, so
/// [`super::configs`] and [`super::rollouts`] have none of their own.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "sm_0001",
        sql: &[
            "CREATE TABLE IF NOT EXISTS sm_services (\
         service_name TEXT PRIMARY KEY, \
         producer_project_id TEXT NOT NULL, \
         deleted BIGINT NOT NULL, \
         op_counter BIGINT NOT NULL, \
         config_day TEXT NOT NULL, \
         config_next BIGINT NOT NULL, \
         rollout_day TEXT NOT NULL, \
         rollout_next BIGINT NOT NULL, \
         policy TEXT NOT NULL, \
         create_time TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS sm_configs (\
         service_name TEXT NOT NULL, \
         config_id TEXT NOT NULL, \
         seq BIGINT NOT NULL, \
         body TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         PRIMARY KEY (service_name, config_id))",
            "CREATE TABLE IF NOT EXISTS sm_rollouts (\
         service_name TEXT NOT NULL, \
         rollout_id TEXT NOT NULL, \
         seq BIGINT NOT NULL, \
         status TEXT NOT NULL, \
         body TEXT NOT NULL, \
         create_time TEXT NOT NULL, \
         PRIMARY KEY (service_name, rollout_id))",
        ],
    },
    // Newest-first listings (configs list, ESP's rollout poll) read these in seq order.
    Migration {
        id: "sm_0002",
        sql: &[
            "CREATE INDEX IF NOT EXISTS sm_configs_by_seq ON sm_configs (service_name, seq)",
            "CREATE INDEX IF NOT EXISTS sm_rollouts_by_seq ON sm_rollouts (service_name, seq)",
        ],
    },
];

/// A live service as listed.
#[derive(Debug, Clone)]
pub struct ServiceRow {
    pub name: String,
    pub producer_project_id: String,
    /// The IAM policy, as stored JSON.
    pub policy: String,
}

/// The stored IAM policy (JSON) and producer project of a live service; `None` if the service
/// does not exist or is deleted. Service Management, Service Usage, Service Control and the
/// permission checks all ask this.
pub async fn policy_and_producer(
    store: &Store,
    service: &str,
) -> Result<Option<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT policy, producer_project_id FROM sm_services \
         WHERE service_name = $1 AND deleted = 0",
    )
    .bind(service)
    .fetch_optional(store.pool())
    .await?)
}

/// The producer project of a live (not deleted) service.
pub async fn producer_project(store: &Store, service: &str) -> Result<Option<String>, StoreError> {
    Ok(policy_and_producer(store, service).await?.map(|(_, p)| p))
}

/// The producer project and deletion flag of a service, deleted or not.
pub async fn producer_and_deleted(
    store: &Store,
    service: &str,
) -> Result<Option<(String, bool)>, StoreError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT producer_project_id, deleted FROM sm_services WHERE service_name = $1",
    )
    .bind(service)
    .fetch_optional(store.pool())
    .await?;
    Ok(row.map(|(p, d)| (p, d != 0)))
}

/// Live services in name order, all or those of one producer project.
pub async fn list_live(
    store: &Store,
    producer: Option<&str>,
) -> Result<Vec<ServiceRow>, StoreError> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT service_name, producer_project_id, policy FROM sm_services \
         WHERE deleted = 0 AND ($1 = '' OR producer_project_id = $1) ORDER BY service_name",
    )
    .bind(producer.unwrap_or_default())
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, producer_project_id, policy)| ServiceRow {
            name,
            producer_project_id,
            policy,
        })
        .collect())
}

/// What [`insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Yes,
    /// The name is taken, by a live service or a deleted one.
    Exists {
        deleted: bool,
    },
}

/// Adds a live service with the given policy (JSON), unless the name is taken.
pub async fn insert(
    conn: &mut AnyConnection,
    service: &str,
    producer: &str,
    policy: &str,
) -> Result<Inserted, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO sm_services (service_name, producer_project_id, deleted, op_counter, \
         config_day, config_next, rollout_day, rollout_next, policy, create_time) \
         VALUES ($1, $2, 0, 0, '', 0, '', 0, $3, $4) ON CONFLICT (service_name) DO NOTHING",
    )
    .bind(service)
    .bind(producer)
    .bind(policy)
    .bind(now_rfc3339())
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() != 0 {
        return Ok(Inserted::Yes);
    }
    let (deleted,): (i64,) =
        sqlx::query_as("SELECT deleted FROM sm_services WHERE service_name = $1")
            .bind(service)
            .fetch_one(&mut *conn)
            .await?;
    Ok(Inserted::Exists {
        deleted: deleted != 0,
    })
}

/// Sets the deletion flag to `deleted`; false if the service was not in the other state (or
/// does not exist).
pub async fn set_deleted(
    conn: &mut AnyConnection,
    service: &str,
    deleted: bool,
) -> Result<bool, StoreError> {
    let done =
        sqlx::query("UPDATE sm_services SET deleted = $1 WHERE service_name = $2 AND deleted = $3")
            .bind(i64::from(deleted))
            .bind(service)
            .bind(i64::from(!deleted))
            .execute(conn)
            .await?;
    Ok(done.rows_affected() != 0)
}

/// Bumps the service's operation counter (for `operations/services.<svc>-<N>`) and returns N.
pub async fn next_operation_number(
    conn: &mut AnyConnection,
    service: &str,
) -> Result<i64, StoreError> {
    sqlx::query("UPDATE sm_services SET op_counter = op_counter + 1 WHERE service_name = $1")
        .bind(service)
        .execute(&mut *conn)
        .await?;
    let (n,): (i64,) = sqlx::query_as("SELECT op_counter FROM sm_services WHERE service_name = $1")
        .bind(service)
        .fetch_one(&mut *conn)
        .await?;
    Ok(n)
}

/// Which per-day id counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Config,
    Rollout,
}

/// `YYYY-MM-DD` in UTC.
pub fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Bumps a per-day counter on the service row and returns the new id (`<day>r<n>`). With
/// `live_only`, `None` if the service is gone or deleted; without, only if it does not exist
/// (a deletion numbers the rollout it records after marking the row deleted). Make it the first
/// write of its transaction (see the module doc).
pub async fn next_id(
    conn: &mut AnyConnection,
    service: &str,
    which: Counter,
    live_only: bool,
) -> Result<Option<String>, StoreError> {
    let day = today();
    // Column names come from this fixed match, never from input.
    let (day_col, next_col) = match which {
        Counter::Config => ("config_day", "config_next"),
        Counter::Rollout => ("rollout_day", "rollout_next"),
    };
    let live = if live_only { " AND deleted = 0" } else { "" };
    let sql = format!(
        "UPDATE sm_services SET {next_col} = CASE WHEN {day_col} = $1 THEN {next_col} + 1 ELSE 1 END, \
         {day_col} = $1 WHERE service_name = $2{live}"
    );
    let done = sqlx::query(&sql)
        .bind(&day)
        .bind(service)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    let (n,): (i64,) = sqlx::query_as(&format!(
        "SELECT {next_col} FROM sm_services WHERE service_name = $1"
    ))
    .bind(service)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some(format!("{day}r{}", n - 1)))
}

/// The id the next config would get, without consuming it (for `validateOnly`).
pub async fn peek_config_id(store: &Store, service: &str) -> Result<String, StoreError> {
    let day = today();
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT config_day, config_next FROM sm_services WHERE service_name = $1")
            .bind(service)
            .fetch_optional(store.pool())
            .await?;
    let n = match row {
        Some((d, n)) if d == day => n,
        _ => 0,
    };
    Ok(format!("{day}r{n}"))
}

/// Locks a live service's row and returns its stored policy (JSON), or `None` if the service
/// is gone. The write comes first so the row lock (and SQLite's write lock) is held before the
/// etag is read.
pub async fn lock_policy(
    conn: &mut AnyConnection,
    service: &str,
) -> Result<Option<String>, StoreError> {
    let touched = sqlx::query(
        "UPDATE sm_services SET policy = policy WHERE service_name = $1 AND deleted = 0",
    )
    .bind(service)
    .execute(&mut *conn)
    .await?;
    if touched.rows_affected() == 0 {
        return Ok(None);
    }
    let (current,): (String,) =
        sqlx::query_as("SELECT policy FROM sm_services WHERE service_name = $1")
            .bind(service)
            .fetch_one(&mut *conn)
            .await?;
    Ok(Some(current))
}

/// Replaces a service's policy (JSON).
pub async fn set_policy(
    conn: &mut AnyConnection,
    service: &str,
    policy: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE sm_services SET policy = $1 WHERE service_name = $2")
        .bind(policy)
        .bind(service)
        .execute(conn)
        .await?;
    Ok(())
}
