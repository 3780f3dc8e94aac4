//! Test helpers: stores on each backend, with a loud skip when PostgreSQL/Redis are absent.

use crate::store::Store;

pub(crate) const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379/";

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Missing service: skip loudly, or fail on CI.
pub(crate) fn skip(what: &str, err: impl std::fmt::Display) {
    if on_ci() {
        panic!("{what} is required on CI: {err}");
    }
    eprintln!("SKIPPED: {what} not available: {err}");
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

pub(crate) async fn sqlite_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_sqlite(dir.path()).await.expect("open sqlite");
    store
        .migrate(&[super::MIGRATIONS])
        .await
        .expect("migrations");
    (dir, store)
}

/// A PostgreSQL store on a fresh schema, or `None` (after a `SKIPPED:` line) when absent.
pub(crate) async fn pg_store() -> Option<(String, Store)> {
    let schema = unique("sc_test");
    match Store::open_postgres(PG_URL, Some(&schema)).await {
        Ok(store) => {
            store
                .migrate(&[super::MIGRATIONS])
                .await
                .expect("migrations");
            Some((schema, store))
        }
        Err(e) => {
            skip("PostgreSQL at 127.0.0.1:5432", e);
            None
        }
    }
}

/// Drops a test schema (best effort: a leftover schema only wastes space).
pub(crate) async fn drop_pg_schema(store: &Store, schema: &str) {
    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await;
}

pub(crate) async fn redis_client() -> Option<redis::Client> {
    let client = match redis::Client::open(REDIS_URL) {
        Ok(c) => c,
        Err(e) => {
            skip("Redis at 127.0.0.1:6379", e);
            return None;
        }
    };
    match tokio::time::timeout(
        std::time::Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(_)) => Some(client),
        Ok(Err(e)) => {
            skip("Redis at 127.0.0.1:6379", e);
            None
        }
        Err(_) => {
            skip("Redis at 127.0.0.1:6379", "connect timed out");
            None
        }
    }
}
