//! Report aggregation at record time: each finished request is merged into its operation
//! signature's [`Aggregate`] the moment it is reported, so what the proxy holds between
//! flushes is bounded by the number of distinct signatures, never by the request rate.
//!
//! * Lock-light: the aggregates live in [`SHARDS`] independently locked hash maps, chosen by
//!   the signature's hash; a request takes one shard lock for an O(1) merge (no allocation
//!   unless its signature is new).
//! * Bounded: a shard holding its share of `report_cache_entries` signatures asks for an
//!   early flush; at twice that share new signatures are refused (counted as dropped
//!   operations) until the reporter has taken the shard.
//! * Log policy ([`LogPolicy`]): request counts and latency distributions stay exact, but
//!   only a bounded number of `endpoints_log` entries is held per flush interval: at most
//!   `per_signature` per signature, and per shard at most `shard_total`, of which successes
//!   (< 400) may take only `shard_successes` — the rest is reserved for errors, so a flood of
//!   successes never crowds out error logs. Entries not kept are counted (reported as
//!   `droppedLogEntries` on `/endpoints_status` and `service_control_report_dropped_log_entries`).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::report::{span, Aggregate, ReportFilter, RequestRecord, SigRef};

/// Independently locked parts of the aggregate table. More shards than cores keeps two
/// workers from meeting on one lock unless they report the same signature.
pub(crate) const SHARDS: usize = 16;

/// ESP closes an operation once it holds this many log entries; the per-signature cap never
/// exceeds it, so one operation per signature and flush always suffices.
pub(crate) const MAX_LOG_ENTRIES_PER_OPERATION: usize = 100;

/// Default for `report_log_entries_per_second`: `endpoints_log` entries kept per signature
/// and second of flush interval.
pub const DEFAULT_LOG_ENTRIES_PER_SECOND: usize = 50;

/// Default for `report_max_log_entries_per_flush`: entries held across all signatures per
/// flush interval (a few MiB at most); half of them are reserved for errors.
pub const DEFAULT_MAX_LOG_ENTRIES_PER_FLUSH: usize = 4096;

/// How many `endpoints_log` entries are held per flush interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogPolicy {
    pub(crate) per_signature: usize,
    pub(crate) shard_total: usize,
    pub(crate) shard_successes: usize,
}

impl LogPolicy {
    /// `per_second` entries per signature and second of `interval` (at least 1 when
    /// `per_second` > 0, at most [`MAX_LOG_ENTRIES_PER_OPERATION`]); `max_per_flush` across
    /// all signatures, split evenly over the shards, half of each shard's share for successes.
    pub(crate) fn new(per_second: usize, interval: Duration, max_per_flush: usize) -> Self {
        let per_signature = if per_second == 0 {
            0
        } else {
            ((per_second as f64 * interval.as_secs_f64()).ceil() as usize)
                .clamp(1, MAX_LOG_ENTRIES_PER_OPERATION)
        };
        let shard_total = max_per_flush.div_ceil(SHARDS);
        LogPolicy {
            per_signature,
            shard_total,
            shard_successes: shard_total / 2,
        }
    }
}

#[derive(Default)]
struct Shard {
    /// Keyed by the signature's hash; the (rare) collisions share a vector and are told apart
    /// by comparing the full signature.
    map: HashMap<u64, Vec<Aggregate>, foldhash::fast::RandomState>,
    signatures: usize,
    logs: usize,
    success_logs: usize,
}

/// What happened to one reported request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Added {
    /// `false`: the table is full of other signatures; the request was not counted.
    pub(crate) accepted: bool,
    /// The config wants its log entry but the log policy did not keep it.
    pub(crate) log_dropped: bool,
    /// The shard holds its share of signatures: flush before the interval ends.
    pub(crate) flush_soon: bool,
}

pub(crate) struct Aggregator {
    shards: Box<[Mutex<Shard>]>,
    /// Seeded foldhash over the signature's fields (SipHash was ~0.7 % of a request's CPU).
    hasher: foldhash::fast::RandomState,
    soft_signatures: usize,
    hard_signatures: usize,
    policy: LogPolicy,
}

impl Aggregator {
    /// `max_signatures`: signatures held before an early flush (0: every request asks for a
    /// flush at once); twice as many are held at most.
    pub(crate) fn new(max_signatures: usize, policy: LogPolicy) -> Self {
        let soft = max_signatures.div_ceil(SHARDS);
        Aggregator {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            soft_signatures: soft,
            hard_signatures: (2 * soft).max(64),
            policy,
        }
    }

    /// Merges one finished request. `filter_for` is asked for the config's declarations only
    /// when the signature is new.
    pub(crate) fn add(
        &self,
        mut record: RequestRecord,
        now: SystemTime,
        filter_for: impl FnOnce(&str) -> Option<Arc<ReportFilter>>,
    ) -> Added {
        let times = span(&record, now);
        let hash = self.hasher.hash_one(SigRef::of(&record));
        let Some(shard) = self.shards.get(hash as usize % SHARDS) else {
            return Added::default();
        };
        // A poisoned shard means a panic elsewhere; losing its reports beats failing requests.
        let Ok(mut guard) = shard.lock() else {
            return Added::default();
        };
        let sh = &mut *guard;
        let sig = SigRef::of(&record);
        let found = sh
            .map
            .get(&hash)
            .and_then(|b| b.iter().position(|a| a.key.as_ref() == sig));
        let index = match found {
            Some(i) => i,
            None => {
                if sh.signatures >= self.hard_signatures {
                    return Added {
                        accepted: false,
                        log_dropped: false,
                        flush_soon: true,
                    };
                }
                let filter = filter_for(&record.service_config_id);
                let bucket = sh.map.entry(hash).or_default();
                bucket.push(Aggregate::new(sig, filter));
                sh.signatures += 1;
                bucket.len() - 1
            }
        };
        let Some(agg) = sh.map.get_mut(&hash).and_then(|b| b.get_mut(index)) else {
            return Added::default();
        };
        agg.add(&record, times);
        let mut added = Added {
            accepted: true,
            log_dropped: false,
            flush_soon: sh.signatures >= self.soft_signatures,
        };
        if agg.wants_logs() {
            let is_error = record.response_code >= 400;
            let keep = agg.logs.len() < self.policy.per_signature
                && sh.logs < self.policy.shard_total
                && (is_error || sh.success_logs < self.policy.shard_successes);
            if keep {
                // The entry is built when sent; pin its time to now.
                record.start_time = Some(times.0);
                agg.logs.push(record);
                sh.logs += 1;
                if !is_error {
                    sh.success_logs += 1;
                }
            } else {
                added.log_dropped = true;
            }
        }
        added
    }

    /// Takes every aggregate, leaving the table empty for the next interval.
    pub(crate) fn take(&self) -> Vec<Aggregate> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = match shard.lock() {
                Ok(mut sh) => {
                    sh.signatures = 0;
                    sh.logs = 0;
                    sh.success_logs = 0;
                    std::mem::take(&mut sh.map)
                }
                Err(_) => continue,
            };
            out.extend(map.into_values().flatten());
        }
        out
    }

    /// Signatures held now.
    pub(crate) fn signatures(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok().map(|sh| sh.signatures))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(code: u16, key: &str) -> RequestRecord {
        RequestRecord {
            service_name: "s".into(),
            service_config_id: "c1".into(),
            operation_name: Some("1.echo.Echo".into()),
            api_key: Some(key.into()),
            api_key_valid: true,
            http_method: "GET".into(),
            url: "/echo".into(),
            response_code: code,
            request_size: 10,
            response_size: 100,
            total_latency: Duration::from_micros(800 + u64::from(code)),
            backend_latency: Some(Duration::from_micros(500)),
            overhead_latency: Duration::from_micros(300),
            protocol: "http".into(),
            ..Default::default()
        }
    }

    fn policy() -> LogPolicy {
        LogPolicy::new(10, Duration::from_secs(1), 4096)
    }

    fn no_filter(_: &str) -> Option<Arc<ReportFilter>> {
        None
    }

    #[test]
    fn memory_is_bounded_by_signatures_not_requests() {
        let agg = Aggregator::new(10_000, policy());
        let now = SystemTime::now();
        for i in 0..50_000u32 {
            let key = format!("K{}", i % 3);
            let code = if i % 5 == 0 { 503 } else { 200 };
            assert!(agg.add(record(code, &key), now, no_filter).accepted);
        }
        assert_eq!(agg.signatures(), 6, "3 keys x 2 response codes");
        let taken = agg.take();
        assert_eq!(taken.len(), 6);
        let total: i64 = taken.iter().map(|a| a.count()).sum();
        assert_eq!(total, 50_000, "every request counted");
        let held_logs: usize = taken.iter().map(|a| a.logs.len()).sum();
        assert_eq!(held_logs, 6 * 10, "10 entries per signature and second");
        assert_eq!(agg.signatures(), 0, "take empties the table");
    }

    #[test]
    fn new_signatures_beyond_the_hard_bound_are_refused_and_flush_is_requested() {
        // 16 signatures → 1 per shard before an early flush; at most 64 per shard.
        let agg = Aggregator::new(16, policy());
        let now = SystemTime::now();
        let mut refused = 0;
        let mut flush_soon = false;
        for i in 0..(SHARDS * 64 + 500) {
            let a = agg.add(record(200, &format!("K{i}")), now, no_filter);
            refused += usize::from(!a.accepted);
            flush_soon |= a.flush_soon;
        }
        assert!(flush_soon);
        assert!(refused >= 500, "refused {refused}");
        assert!(agg.signatures() <= SHARDS * 64);
        // Known signatures still merge while new ones are refused.
        let known = agg.take().into_iter().next().expect("one aggregate");
        assert_eq!(known.count(), 1);
    }

    #[test]
    fn log_entries_are_capped_per_signature_and_drops_are_reported() {
        let agg = Aggregator::new(10_000, LogPolicy::new(5, Duration::from_secs(2), 4096));
        let now = SystemTime::now();
        let mut dropped = 0;
        for _ in 0..100 {
            dropped += usize::from(agg.add(record(200, "K"), now, no_filter).log_dropped);
        }
        let taken = agg.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].count(), 100);
        assert_eq!(taken[0].logs.len(), 10, "5 per second x 2 s interval");
        assert_eq!(dropped, 90);
        // The next interval starts with a fresh budget.
        assert!(!agg.add(record(200, "K"), now, no_filter).log_dropped);
    }

    #[test]
    fn errors_keep_their_share_when_successes_flood() {
        // 32 entries per flush → 2 per shard, 1 of them for successes.
        let agg = Aggregator::new(10_000, LogPolicy::new(100, Duration::from_secs(1), 32));
        let now = SystemTime::now();
        for i in 0..2000 {
            agg.add(record(200, &format!("ok{}", i % 200)), now, no_filter);
        }
        let mut error_kept = 0;
        for i in 0..200 {
            let a = agg.add(record(500, &format!("err{i}")), now, no_filter);
            error_kept += usize::from(!a.log_dropped);
        }
        let taken = agg.take();
        let logs = |err: bool| -> usize {
            taken
                .iter()
                .flat_map(|a| &a.logs)
                .filter(|r| (r.response_code >= 400) == err)
                .count()
        };
        assert!(logs(false) <= SHARDS, "successes: at most 1 per shard");
        assert!(logs(true) >= SHARDS, "errors: at least 1 per shard");
        assert_eq!(logs(true), error_kept);
        assert_eq!(
            taken.iter().map(|a| a.count()).sum::<i64>(),
            2200,
            "counts exact regardless of logs"
        );
    }

    #[test]
    fn configs_without_endpoints_log_hold_no_entries_and_count_no_drops() {
        let agg = Aggregator::new(10_000, policy());
        let filter = Arc::new(ReportFilter::from_service(
            &portico_config::Service::default(),
        ));
        for _ in 0..20 {
            let a = agg.add(record(200, "K"), SystemTime::now(), |_| {
                Some(filter.clone())
            });
            assert!(a.accepted && !a.log_dropped);
        }
        let taken = agg.take();
        assert!(taken[0].logs.is_empty());
    }

    #[test]
    fn counts_and_latencies_are_exact_under_concurrency() {
        let agg = Arc::new(Aggregator::new(10_000, policy()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let agg = agg.clone();
                std::thread::spawn(move || {
                    for i in 0..5000u64 {
                        let mut r = record(200, "K");
                        r.total_latency = Duration::from_micros(1 + (i + t) % 1000);
                        agg.add(r, SystemTime::now(), no_filter);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        let taken = agg.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].count(), 20_000);
        let ops = taken[0].operations(&super::super::report::test_statics());
        let lat = ops[0]
            .metric_value_sets
            .iter()
            .find(|m| m.metric_name.ends_with("producer/total_latencies"))
            .and_then(|m| m.metric_values[0].distribution_value.clone())
            .expect("latencies");
        assert_eq!(lat.count, 20_000);
        assert_eq!(lat.bucket_counts.iter().sum::<i64>(), 20_000);
        assert!((lat.minimum - 1e-6).abs() < 1e-12 && (lat.maximum - 1e-3).abs() < 1e-12);
    }
}
