//! Storage: one [`Store`] over `sqlx::AnyPool`, SQLite (embedded, WAL) or PostgreSQL.
//!
//! # Writing SQL that runs on both
//! - Placeholders are `$1, $2, ...` (both drivers accept them; see the test below).
//! - Column types: `TEXT` and `BIGINT` only. Booleans are `BIGINT` 0/1, bytes are base64 `TEXT`,
//!   timestamps are RFC 3339 `TEXT` (UTC, `Z`), JSON documents are `TEXT`.
//! - No `AUTOINCREMENT`/`SERIAL`: ids are generated in Rust (uuid, counters in a row).
//! - `INSERT ... ON CONFLICT (...) DO NOTHING / DO UPDATE` works on both.
//! - Start transactions that write with [`Store::begin_write`]: on SQLite it is `BEGIN
//!   IMMEDIATE`, which takes the write lock up front (waiting up to the busy timeout), because a
//!   deferred transaction that reads and then writes fails with "database is locked" when another
//!   writer committed in between. On PostgreSQL it is a plain `BEGIN`; lock the rows you will
//!   update by updating them first (or `SELECT ... FOR UPDATE`, PostgreSQL only).
//!
//! # Registering a module's schema
//! A module declares `pub const MIGRATIONS: &[Migration] = &[Migration { id: "iam_0001", sql: &[
//! "CREATE TABLE IF NOT EXISTS ..."] }];` and adds it to [`migrations`]. Each migration runs
//! once, in a transaction, recorded in `schema_migrations`. Never edit a shipped migration; add
//! `iam_0002`. Ids are global, so prefix them with the module name.

pub mod accounts;
pub mod configs;
pub mod idtoken_keys;
pub mod keys;
pub mod operations;
pub mod policies;
pub mod projects;
pub mod rollouts;
pub mod servicecontrol;
pub mod services;
pub mod tokens;
pub mod traces;
pub mod usage;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Globally unique, prefixed with the owning module (`sm_0001`).
    pub id: &'static str,
    /// Statements executed in order inside one transaction.
    pub sql: &'static [&'static str],
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration {id} failed: {source}")]
    Migration {
        id: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid database schema name {0:?} (use letters, digits and _)")]
    SchemaName(String),
    #[error("unsupported database URL (expected postgres:// or postgresql://)")]
    UnsupportedUrl,
}

/// Which engine is behind the pool; a few statements (locks, pragmas) differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Cheap to clone; all clones share the pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// Creates an empty `path` readable by the owner only, unless it exists.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Store {
    /// Opens (creating on first use) `DIR/portico.db` in WAL mode, owner-only.
    pub async fn open_sqlite(dir: &Path) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("portico.db");
        // SQLite gives its -wal and -shm files the database file's mode, so a database
        // created 0600 here keeps all three private.
        create_private_file(&path).map_err(|source| StoreError::DataDir {
            path: path.display().to_string(),
            source,
        })?;
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let opts = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // busy_timeout makes concurrent writers wait instead of failing at once;
                    // foreign_keys is per-connection in SQLite.
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        // WAL is a property of the database file, so setting it once is enough.
        pool.execute("PRAGMA journal_mode = WAL").await?;
        for name in crate::datadir::SQLITE_FILES {
            crate::datadir::tighten(&dir.join(name), 0o600);
        }
        Ok(Store {
            pool,
            backend: Backend::Sqlite,
        })
    }

    /// Connects to PostgreSQL. With `schema`, the schema is created if needed and every pooled
    /// connection uses it as its `search_path` (tests get a fresh schema per run this way; a
    /// `?options=-csearch_path%3D<schema>` URL works too).
    pub async fn open_postgres(url: &str, schema: Option<&str>) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::UnsupportedUrl);
        }
        let schema = match schema {
            Some(s) => {
                if s.is_empty()
                    || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    || s.starts_with(|c: char| c.is_ascii_digit())
                {
                    return Err(StoreError::SchemaName(s.to_string()));
                }
                Some(s.to_string())
            }
            None => None,
        };
        let opts = AnyConnectOptions::from_str(url)?;
        if let Some(s) = &schema {
            let setup = AnyPoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone())
                .await?;
            // Concurrent `CREATE SCHEMA IF NOT EXISTS` can still collide on the catalog's
            // unique index, so replicas take the migration lock for it too.
            let mut conn = setup.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock(727326)")
                .execute(&mut *conn)
                .await?;
            let created = conn
                .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{s}\"").as_str())
                .await;
            let _ = sqlx::query("SELECT pg_advisory_unlock(727326)")
                .execute(&mut *conn)
                .await;
            drop(conn);
            setup.close().await;
            created?;
        }
        let search_path = schema.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                let search_path = search_path.clone();
                Box::pin(async move {
                    if let Some(s) = search_path {
                        conn.execute(format!("SET search_path TO \"{s}\"").as_str())
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        Ok(Store {
            pool,
            backend: Backend::Postgres,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a transaction that will write (see the module doc).
    pub async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx(tx))
    }

    /// Applies every migration not yet recorded, in the given order.
    pub async fn migrate(&self, sets: &[&[Migration]]) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            // Replicas starting together must not race: even `CREATE TABLE IF NOT EXISTS` can
            // fail on PostgreSQL when two sessions run it at once. A session-level advisory lock
            // held on this one connection serialises the whole run.
            sqlx::query("SELECT pg_advisory_lock(727326)")
                .execute(&mut *conn)
                .await?;
        }
        let result = Self::migrate_on(&mut conn, sets).await;
        if self.backend == Backend::Postgres {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock(727326)")
                .execute(&mut *conn)
                .await;
            if result.is_err() || unlocked.is_err() {
                // Closing the session releases the lock whatever state it is in.
                let _ = conn.close().await;
            }
        }
        result
    }

    async fn migrate_on(
        conn: &mut sqlx::AnyConnection,
        sets: &[&[Migration]],
    ) -> Result<(), StoreError> {
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
             id TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .await?;
        for m in sets.iter().flat_map(|s| s.iter()) {
            let done: Option<(String,)> =
                sqlx::query_as("SELECT id FROM schema_migrations WHERE id = $1")
                    .bind(m.id)
                    .fetch_optional(&mut *conn)
                    .await?;
            if done.is_some() {
                continue;
            }
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for stmt in m.sql {
                tx.execute(*stmt)
                    .await
                    .map_err(|source| StoreError::Migration { id: m.id, source })?;
            }
            sqlx::query("INSERT INTO schema_migrations (id, applied_at) VALUES ($1, $2)")
                .bind(m.id)
                .bind(now_rfc3339())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::debug!(migration = m.id, "applied migration");
        }
        Ok(())
    }
}

/// Nanoseconds since the epoch: a creation order that sorts as an integer (RFC 3339 text with
/// trimmed fractions does not).
pub fn creation_seq() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// Current UTC time as RFC 3339 with a `Z` suffix and up to nanosecond precision (Google's style).
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

pub fn format_rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Every resource's schema, applied in this order at start-up (a table another references
/// comes first).
pub fn migrations() -> Vec<&'static [Migration]> {
    vec![
        projects::MIGRATIONS,
        operations::MIGRATIONS,
        services::MIGRATIONS,
        usage::MIGRATIONS,
        accounts::MIGRATIONS,
        policies::MIGRATIONS,
        tokens::MIGRATIONS,
        keys::MIGRATIONS,
        idtoken_keys::MIGRATIONS,
        servicecontrol::MIGRATIONS,
        traces::MIGRATIONS,
    ]
}

/// A write transaction from [`Store::begin_write`]. Handlers hold one across several store
/// calls (each takes `&mut` the connection it derefs to) and commit it; its errors are
/// [`StoreError`]s like every other store call, so no layer above the store names `sqlx`.
/// Dropped without [`WriteTx::commit`], it rolls back.
pub struct WriteTx(sqlx::Transaction<'static, sqlx::Any>);

impl WriteTx {
    pub async fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit().await?)
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.0.rollback().await?)
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        &self.0
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const TEST_MIGRATIONS: &[Migration] = &[Migration {
        id: "test_0001",
        sql: &["CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, n BIGINT NOT NULL)"],
    }];

    pub(crate) async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_sqlite(dir.path()).await.expect("open sqlite");
        (dir, store)
    }

    #[tokio::test]
    async fn dollar_placeholders_and_migrations_on_sqlite() {
        let (_d, store) = temp_store().await;
        store.migrate(&[TEST_MIGRATIONS]).await.unwrap();
        // Applying twice is a no-op.
        store.migrate(&[TEST_MIGRATIONS]).await.unwrap();
        sqlx::query("INSERT INTO t (k, n) VALUES ($1, $2)")
            .bind("a")
            .bind(5_i64)
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (k, n) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING")
            .bind("a")
            .bind(7_i64)
            .execute(store.pool())
            .await
            .unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT n FROM t WHERE k = $1")
            .bind("a")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 5);
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_then_write_transactions_do_not_fail_on_sqlite() {
        let (_d, store) = temp_store().await;
        store.migrate(&[TEST_MIGRATIONS]).await.unwrap();
        sqlx::query("INSERT INTO t (k, n) VALUES ('c', 0)")
            .execute(store.pool())
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    let mut tx = store.begin_write().await?;
                    let (n,): (i64,) = sqlx::query_as("SELECT n FROM t WHERE k = 'c'")
                        .fetch_one(&mut *tx)
                        .await?;
                    tokio::task::yield_now().await;
                    sqlx::query("UPDATE t SET n = $1 WHERE k = 'c'")
                        .bind(n + 1)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                Ok::<(), StoreError>(())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (n,): (i64,) = sqlx::query_as("SELECT n FROM t WHERE k = 'c'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 40, "lost updates");
    }

    /// Two replicas migrating one fresh PostgreSQL schema at once both succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_migrations_on_postgres() {
        let reachable = tokio::net::TcpStream::connect("127.0.0.1:5432")
            .await
            .is_ok();
        if !reachable {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("PostgreSQL is not reachable on 127.0.0.1:5432 and CI=true");
            }
            eprintln!("SKIPPED: concurrent_migrations_on_postgres: no PostgreSQL on 5432");
            return;
        }
        let url = "postgres://postgres@127.0.0.1:5432/test";
        let schema = format!("cp_{}", uuid::Uuid::new_v4().simple());
        const MANY: &[Migration] = &[
            TEST_MIGRATIONS[0],
            Migration {
                id: "test_0002",
                sql: &["CREATE TABLE IF NOT EXISTS t2 (k TEXT PRIMARY KEY)"],
            },
        ];
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let schema = schema.clone();
            tasks.push(tokio::spawn(async move {
                let store = Store::open_postgres(url, Some(&schema)).await?;
                store.migrate(&[MANY]).await?;
                Ok::<Store, StoreError>(store)
            }));
        }
        let mut stores = Vec::new();
        for t in tasks {
            stores.push(t.await.unwrap().unwrap());
        }
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(stores[0].pool())
            .await
            .unwrap();
        assert_eq!(n, 2);
        sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(stores[0].pool())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn rejects_bad_schema_name() {
        let e = Store::open_postgres("postgres://x@127.0.0.1/test", Some("a;drop"))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::SchemaName(_)));
    }
}
