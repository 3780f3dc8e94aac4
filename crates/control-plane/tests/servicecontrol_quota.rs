//! Service Control's quota below the HTTP layer: planning limits into counters, the modes'
//! decisions, and the counter backends under concurrency — four independent clients (separate
//! pools or Redis connections, like four control-plane replicas) race for one limit on SQLite,
//! PostgreSQL and Redis; exactly the limit is admitted, never more, never less.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use portico_config::service::{Quota, QuotaLimit, Service};
use portico_control_plane::apis::servicecontrol::quota::*;
use portico_control_plane::store::Store;
use support::testutil;

fn config_with_limits(limits: &[(&str, &str, &str, i64)]) -> Service {
    Service {
        name: "svc.example.com".into(),
        quota: Some(Quota {
            limits: limits
                .iter()
                .map(|(name, metric, unit, v)| QuotaLimit {
                    name: name.to_string(),
                    metric: metric.to_string(),
                    unit: unit.to_string(),
                    values: [("STANDARD".to_string(), *v)].into_iter().collect(),
                    ..Default::default()
                })
                .collect(),
            metric_rules: vec![],
        }),
        ..Default::default()
    }
}

fn costs(v: &[(&str, i64)]) -> BTreeMap<String, i64> {
    v.iter().map(|(k, c)| (k.to_string(), *c)).collect()
}

#[test]
fn units() {
    assert_eq!(
        parse_unit("1/min/{project}"),
        Ok(Window {
            len_ms: 60_000,
            per_project: true
        })
    );
    assert_eq!(
        parse_unit("1/d/{project}").map(|w| w.len_ms),
        Ok(86_400_000)
    );
    assert_eq!(
        parse_unit("1/min").map(|w| w.per_project),
        Ok(false),
        "a limit without {{project}} is shared"
    );
    assert!(parse_unit("1/{project}").is_err());
    assert!(parse_unit("2/min/{project}").is_err());
    assert!(parse_unit("1/fortnight/{project}").is_err());
}

#[test]
fn windows_align_to_epoch() {
    let w = parse_unit("1/min/{project}").unwrap();
    assert_eq!(w.start(119_999), 60_000);
    assert_eq!(w.start(120_000), 120_000);
    let d = parse_unit("1/d/{project}").unwrap();
    assert_eq!(d.start(86_400_000 * 3 + 5), 86_400_000 * 3);
}

#[test]
fn plan_matches_limits_to_metrics() {
    let cfg = config_with_limits(&[
        ("read-per-min", "read-requests", "1/min/{project}", 10),
        ("read-per-day", "read-requests", "1/d/{project}", 100),
        ("write-per-min", "write-requests", "1/min/{project}", 5),
        ("unlimited", "write-requests", "1/min/{project}", -1),
    ]);
    let specs = plan(
        &cfg,
        "project_number:7",
        &costs(&[("read-requests", 2), ("other", 4)]),
        61_000,
    )
    .unwrap();
    assert_eq!(specs.len(), 2);
    assert!(specs
        .iter()
        .all(|s| s.cost == 2 && s.metric == "read-requests"));
    let min = specs
        .iter()
        .find(|s| s.limit_name == "read-per-min")
        .unwrap();
    assert_eq!((min.window_start_ms, min.limit), (60_000, 10));
    let day = specs
        .iter()
        .find(|s| s.limit_name == "read-per-day")
        .unwrap();
    assert_eq!((day.window_start_ms, day.limit), (0, 100));

    let specs = plan(
        &cfg,
        "project_number:7",
        &costs(&[("write-requests", 1)]),
        0,
    )
    .unwrap();
    assert_eq!(specs.len(), 1, "-1 is unlimited");

    assert!(matches!(
        plan(&cfg, "p", &costs(&[("read-requests", -1)]), 0),
        Err(PlanError::NegativeCost { .. })
    ));
    let bad = config_with_limits(&[("x", "m", "1/{project}", 1)]);
    assert!(matches!(
        plan(&bad, "p", &costs(&[("m", 1)]), 0),
        Err(PlanError::BadLimit { .. })
    ));
}

#[test]
fn decide_modes() {
    let cfg = config_with_limits(&[
        ("a", "m1", "1/min/{project}", 10),
        ("b", "m2", "1/min/{project}", 10),
    ]);
    let specs = plan(&cfg, "c", &costs(&[("m1", 4), ("m2", 4)]), 0).unwrap();
    // m2 has only 3 left.
    let used = [0, 7];
    let n = decide(QuotaMode::Normal, &specs, &used);
    assert_eq!(n.iter().map(|g| g.granted).collect::<Vec<_>>(), vec![0, 0]);
    assert_eq!(
        n.iter().map(|g| g.fits).collect::<Vec<_>>(),
        vec![true, false]
    );
    let b = decide(QuotaMode::BestEffort, &specs, &used);
    assert_eq!(b.iter().map(|g| g.granted).collect::<Vec<_>>(), vec![4, 3]);
    let c = decide(QuotaMode::CheckOnly, &specs, &used);
    assert_eq!(c.iter().map(|g| g.granted).collect::<Vec<_>>(), vec![0, 0]);
    let ok = decide(QuotaMode::Normal, &specs, &[0, 6]);
    assert_eq!(ok.iter().map(|g| g.granted).collect::<Vec<_>>(), vec![4, 4]);
}

#[test]
fn description_text() {
    let cfg = config_with_limits(&[("read-limit", "read-requests", "1/min/{project}", 1)]);
    let specs = plan(
        &cfg,
        "project_number:42",
        &costs(&[("read-requests", 1)]),
        0,
    )
    .unwrap();
    assert_eq!(
        exhausted_description(&specs[0], "project_number:42"),
        "Quota exceeded for quota metric 'read-requests' and limit 'read-limit' of service \
         'svc.example.com' for consumer 'project_number:42'."
    );
}

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

async fn redis_clients(prefix: &str) -> Option<Vec<RedisCounters>> {
    let client = testutil::redis_client().await?;
    let mut out = Vec::new();
    for _ in 0..CLIENTS {
        out.push(
            RedisCounters::connect(client.clone(), prefix)
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
