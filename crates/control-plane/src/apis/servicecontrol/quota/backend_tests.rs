//! The counter backends under concurrency: four independent clients (separate pools or Redis
//! connections, like four control-plane replicas) race for one limit; exactly the limit is
//! admitted, never more, never less.

use std::sync::Arc;

use super::sql::SqlCounters;
use super::tests::{config_with_limits, costs};
use super::*;
use crate::apis::servicecontrol::testutil;
use crate::store::Store;

const LIMIT: i64 = 40;
const CLIENTS: usize = 4;
const ATTEMPTS_PER_CLIENT: usize = 25;

fn specs(now_ms: i64, cost: i64) -> Vec<CounterSpec> {
    let cfg = config_with_limits(&[("per-min", "requests", "1/min/{project}", LIMIT)]);
    plan(
        &cfg,
        "project_number:1",
        &costs(&[("requests", cost)]),
        now_ms,
    )
    .expect("plan")
}

/// Runs `CLIENTS` tasks, each making `ATTEMPTS_PER_CLIENT` allocations; returns the number of
/// fully granted allocations and the total units granted.
async fn race(clients: Vec<Counters>, mode: QuotaMode, cost: i64) -> (i64, i64) {
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut tasks = Vec::new();
    for c in clients {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let (mut full, mut units) = (0i64, 0i64);
            for _ in 0..ATTEMPTS_PER_CLIENT {
                let g = c
                    .allocate(mode, &specs(1_000, cost), 1_000)
                    .await
                    .expect("allocate");
                if g[0].fits {
                    full += 1;
                }
                units += g[0].granted;
            }
            (full, units)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (f, u) = tokio::time::timeout(std::time::Duration::from_secs(60), t)
            .await
            .expect("race finished in time")
            .expect("task");
        total.0 += f;
        total.1 += u;
    }
    total
}

async fn exact_under_concurrency(make: impl Fn() -> Counters, used: impl AsyncFnOnce() -> i64) {
    let clients: Vec<Counters> = (0..CLIENTS).map(|_| make()).collect();
    let (full, units) = race(clients, QuotaMode::Normal, 1).await;
    assert_eq!(full, LIMIT, "NORMAL admits exactly the limit");
    assert_eq!(units, LIMIT);
    assert_eq!(used().await, LIMIT, "denied allocations consume nothing");
}

async fn best_effort_fills_exactly(make: impl Fn() -> Counters) {
    // Cost 3 does not divide 40: best effort hands out the final single unit as a partial grant.
    let clients: Vec<Counters> = (0..CLIENTS).map(|_| make()).collect();
    let (full, units) = race(clients, QuotaMode::BestEffort, 3).await;
    assert_eq!(
        units, LIMIT,
        "best effort consumes exactly what was available"
    );
    assert_eq!(full, LIMIT / 3);
}

async fn rollover_and_modes(c: Counters) {
    let clock = ManualClock::new(60_000 * 1000 + 59_000);
    let cfg = config_with_limits(&[
        ("per-min", "requests", "1/min/{project}", 2),
        ("per-day", "requests", "1/d/{project}", 3),
    ]);
    let alloc = |mode| {
        let specs = plan(
            &cfg,
            "project_number:9",
            &costs(&[("requests", 1)]),
            clock.now_ms(),
        )
        .expect("plan");
        let c = c.clone();
        let now = clock.now_ms();
        async move { c.allocate(mode, &specs, now).await.expect("allocate") }
    };
    assert!(alloc(QuotaMode::CheckOnly).await.iter().all(|g| g.fits));
    assert!(alloc(QuotaMode::Normal).await.iter().all(|g| g.fits));
    assert!(alloc(QuotaMode::Normal).await.iter().all(|g| g.fits));
    // Minute limit reached; the day limit (3) is not, but NORMAL is all-or-nothing.
    let third = alloc(QuotaMode::Normal).await;
    assert_eq!(
        third
            .iter()
            .map(|g| (g.granted, g.fits))
            .collect::<Vec<_>>(),
        vec![(0, true), (0, false)]
    );
    assert!(!alloc(QuotaMode::CheckOnly).await.iter().all(|g| g.fits));
    // The next minute starts a fresh minute window; the day window carries over.
    clock.advance(1_000);
    let fourth = alloc(QuotaMode::Normal).await;
    assert!(
        fourth.iter().all(|g| g.fits && g.granted == 1),
        "{fourth:?}"
    );
    let fifth = alloc(QuotaMode::Normal).await;
    assert_eq!(
        fifth.iter().map(|g| g.fits).collect::<Vec<_>>(),
        vec![false, true],
        "day limit of 3 exhausted, minute has room"
    );
    // Old minute windows can be pruned; the current ones survive.
    let pruned = c.prune(clock.now_ms()).await.expect("prune");
    if c.kind() != "redis" {
        assert_eq!(pruned, 1);
    }
    assert!(!alloc(QuotaMode::Normal).await.iter().all(|g| g.fits));
}

fn sql_counters(store: &Store) -> Counters {
    Counters::Sql(SqlCounters::new(store.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_exact_admission_with_four_clients() {
    let (dir, store) = testutil::sqlite_store().await;
    // Four pools on one database file, as if four processes shared it.
    let mut stores = vec![store.clone()];
    for _ in 1..CLIENTS {
        stores.push(Store::open_sqlite(dir.path()).await.expect("open"));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let make =
        || sql_counters(&stores[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % CLIENTS]);
    let probe = SqlCounters::new(store.clone());
    exact_under_concurrency(make, async || {
        probe.used(&specs(1_000, 1)[0]).await.expect("used")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_best_effort_and_rollover() {
    let (_dir, store) = testutil::sqlite_store().await;
    best_effort_fills_exactly(|| sql_counters(&store)).await;
    let (_dir2, store2) = testutil::sqlite_store().await;
    rollover_and_modes(sql_counters(&store2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_exact_admission_with_four_clients() {
    let Some((schema, store)) = testutil::pg_store().await else {
        return;
    };
    let mut stores = vec![store.clone()];
    for _ in 1..CLIENTS {
        stores.push(
            Store::open_postgres(testutil::PG_URL, Some(&schema))
                .await
                .expect("open"),
        );
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let make =
        || sql_counters(&stores[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % CLIENTS]);
    let probe = SqlCounters::new(store.clone());
    exact_under_concurrency(make, async || {
        probe.used(&specs(1_000, 1)[0]).await.expect("used")
    })
    .await;
    testutil::drop_pg_schema(&store, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_best_effort_and_rollover() {
    let Some((schema, store)) = testutil::pg_store().await else {
        return;
    };
    best_effort_fills_exactly(|| sql_counters(&store)).await;
    sqlx::query("DELETE FROM sc_quota_counters")
        .execute(store.pool())
        .await
        .expect("clear");
    rollover_and_modes(sql_counters(&store)).await;
    testutil::drop_pg_schema(&store, &schema).await;
}

async fn redis_clients(prefix: &str) -> Option<Vec<redis_counters::RedisCounters>> {
    let client = testutil::redis_client().await?;
    let mut out = Vec::new();
    for _ in 0..CLIENTS {
        out.push(
            redis_counters::RedisCounters::connect(client.clone(), prefix)
                .await
                .expect("connect"),
        );
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_exact_admission_with_four_clients() {
    let prefix = format!("{}:", testutil::unique("portico_test"));
    let Some(clients) = redis_clients(&prefix).await else {
        return;
    };
    let probe = clients[0].clone();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let make = || {
        Counters::Redis(
            clients[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % CLIENTS].clone(),
        )
    };
    exact_under_concurrency(make, async || {
        probe.used(&specs(1_000, 1)[0]).await.expect("used")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_best_effort_and_rollover() {
    let prefix = format!("{}:", testutil::unique("portico_test"));
    let Some(clients) = redis_clients(&prefix).await else {
        return;
    };
    best_effort_fills_exactly(|| Counters::Redis(clients[0].clone())).await;
    let prefix2 = format!("{}:", testutil::unique("portico_test"));
    let Some(clients2) = redis_clients(&prefix2).await else {
        return;
    };
    rollover_and_modes(Counters::Redis(clients2[0].clone())).await;
}
