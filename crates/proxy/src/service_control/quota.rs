//! Quota: the verdict cache and token aggregation behind `allocate_quota` (ESP's quota
//! aggregator). The request path only reads the cache and adds tokens; `:allocateQuota` calls
//! happen in the background:
//! * the first request of a signature (method + consumer + metric names) is allowed at once
//!   and triggers an allocation for its cost;
//! * later requests use the cached verdict and, while it is positive, add their cost to a
//!   pending total that is sent every refresh interval (`BEST_EFFORT`);
//! * a negative verdict is re-asked every interval with the request's cost in `NORMAL` mode,
//!   so access resumes once the window resets;
//! * a failed call (network, HTTP error, garbage) counts as positive: quota fails open.
//!
//! The network half, `send_allocation` (one `:allocateQuota` call, its verdict stored back in
//! the cache), is at the end; the facade and the housekeeping task in [`super`] spawn it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_config::Service;
use portico_servicecontrol::{
    AllocateQuotaRequest, AllocateQuotaResponse, MetricValue, MetricValueSet, QuotaOperation,
};

use super::Inner;
use crate::error::{Cause, Code, ErrorKind, EspError};
use crate::outbound_auth::QUOTA_CONTROLLER;

/// The quota metric costs of `selector` (`quota.metricRules`); a cost ≤ 0 counts as 1, as in ESP.
pub fn metric_costs(service: &Service, selector: &str) -> Vec<(String, i64)> {
    let Some(quota) = &service.quota else {
        return Vec::new();
    };
    quota
        .metric_rules
        .iter()
        .filter(|r| r.selector == selector)
        .flat_map(|r| r.metric_costs.iter())
        .map(|(name, cost)| (name.clone(), (*cost).max(1)))
        .collect()
}

/// Client-facing error for the first allocate error (ESP `proto.cc`): always `internal`.
pub(crate) fn quota_error_to_esp(code: &str, description: &str) -> EspError {
    let message = if description.is_empty() {
        format!("Quota allocation failed: {code}")
    } else {
        description.to_string()
    };
    let c = match code {
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "BILLING_NOT_ACTIVE" | "PROJECT_DELETED" => Code::PermissionDenied,
        "API_KEY_INVALID" | "API_KEY_EXPIRED" => Code::InvalidArgument,
        _ => Code::Internal,
    };
    EspError::new(c, message, Cause::Internal).with_kind(ErrorKind::QuotaRefused {
        code: code.into(),
        description: description.into(),
    })
}

pub(crate) fn verdict(resp: &AllocateQuotaResponse) -> Result<(), EspError> {
    match resp.allocate_errors.first() {
        None => Ok(()),
        Some(e) => Err(quota_error_to_esp(&e.code, &e.description)),
    }
}

/// What to send for one entry.
pub(crate) struct Allocation {
    pub(crate) key: String,
    pub(crate) service: String,
    pub(crate) config_id: String,
    pub(crate) operation: QuotaOperation,
}

pub(crate) struct Entry {
    service: String,
    config_id: String,
    method_name: String,
    consumer_id: String,
    labels: BTreeMap<String, String>,
    /// The cost of one request; used for the NORMAL-mode re-ask of a negative verdict.
    unit_cost: BTreeMap<String, i64>,
    pending: BTreeMap<String, i64>,
    /// `None` until the first answer: the temporary positive verdict.
    verdict: Option<Result<(), EspError>>,
    in_flight: bool,
    last_used: Instant,
    last_sent: Instant,
}

pub(crate) struct NewEntry<'a> {
    pub(crate) service: &'a str,
    pub(crate) config_id: &'a str,
    pub(crate) method_name: &'a str,
    /// Built only when the signature is new, like the labels.
    pub(crate) consumer_id: &'a dyn Fn() -> String,
    /// Built only when the signature is new: hits never pay for the label map.
    pub(crate) labels: &'a dyn Fn() -> BTreeMap<String, String>,
    pub(crate) costs: &'a [(String, i64)],
}

/// What an entry costs besides its strings (map slot, headers, the maps' nodes).
const ENTRY_OVERHEAD: usize = 256 + std::mem::size_of::<String>() + std::mem::size_of::<Entry>();

impl Entry {
    /// The bytes the entry holds, approximately: what the byte bound counts. Metric names are
    /// counted twice (unit cost and pending); labels hold the client's referer.
    fn cost(&self, key: &str) -> usize {
        let metrics: usize = self.unit_cost.keys().map(|k| 2 * (k.len() + 48)).sum();
        let labels: usize = self
            .labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum();
        ENTRY_OVERHEAD
            + key.len()
            + self.service.len()
            + self.config_id.len()
            + self.method_name.len()
            + self.consumer_id.len()
            + metrics
            + labels
    }
}

pub(crate) struct QuotaCache {
    /// Seeded foldhash, as in the check cache.
    entries: HashMap<String, Entry, foldhash::fast::RandomState>,
    max_entries: usize,
    max_bytes: usize,
    /// Sum of [`Entry::cost`] over the entries.
    bytes: usize,
    refresh: Duration,
    expiration: Duration,
}

pub(crate) enum Decision {
    Allow,
    /// Allowed; this new signature must be allocated now.
    AllowAndSend(Allocation),
    Deny(EspError),
}

/// The cache key of a quota charge: service, config id and [`signature`], built in one
/// allocation (the consumer id is written in place, metric names sorted only when several).
pub(crate) fn cache_key(input: &super::QuotaInput<'_>) -> String {
    let names_len: usize = input.metric_costs.iter().map(|(n, _)| n.len() + 1).sum();
    let mut k = String::with_capacity(
        input.service_name.len()
            + input.service_config_id.len()
            + input.method_name.len()
            + input.api_key.len().max(input.producer_project_id.len())
            + names_len
            + 16,
    );
    for part in [
        input.service_name,
        input.service_config_id,
        input.method_name,
    ] {
        k.push_str(part);
        k.push('\u{0}');
    }
    if input.api_key.is_empty() {
        k.push_str("project:");
        k.push_str(input.producer_project_id);
    } else {
        k.push_str("api_key:");
        k.push_str(input.api_key);
    }
    k.push('\u{0}');
    match input.metric_costs {
        [(only, _)] => k.push_str(only),
        costs => {
            let mut names: Vec<&str> = costs.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            for (i, n) in names.iter().enumerate() {
                if i > 0 {
                    k.push('\u{0}');
                }
                k.push_str(n);
            }
        }
    }
    k
}

/// The key's tail as a plain function: what [`cache_key`] must agree with.
#[cfg(test)]
pub(crate) fn signature(method: &str, consumer: &str, costs: &[(String, i64)]) -> String {
    let mut names: Vec<&str> = costs.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    format!("{method}\u{0}{consumer}\u{0}{}", names.join("\u{0}"))
}

fn to_metrics(costs: &BTreeMap<String, i64>) -> Vec<MetricValueSet> {
    costs
        .iter()
        .map(|(name, cost)| MetricValueSet {
            metric_name: name.clone(),
            metric_values: vec![MetricValue {
                int64_value: Some(*cost),
                ..Default::default()
            }],
        })
        .collect()
}

impl Entry {
    fn allocation(&self, key: &str, costs: &BTreeMap<String, i64>, mode: &str) -> Allocation {
        Allocation {
            key: key.to_string(),
            service: self.service.clone(),
            config_id: self.config_id.clone(),
            operation: QuotaOperation {
                operation_id: uuid::Uuid::new_v4().to_string(),
                method_name: self.method_name.clone(),
                consumer_id: self.consumer_id.clone(),
                labels: self.labels.clone(),
                quota_metrics: to_metrics(costs),
                quota_mode: mode.to_string(),
            },
        }
    }
}

impl QuotaCache {
    pub(crate) fn new(
        max_entries: usize,
        max_bytes: usize,
        refresh: Duration,
        expiration: Duration,
    ) -> Self {
        QuotaCache {
            entries: HashMap::default(),
            max_entries: max_entries.max(1),
            max_bytes,
            bytes: 0,
            refresh,
            expiration,
        }
    }

    pub(crate) fn decide(&mut self, key: String, new: NewEntry<'_>, now: Instant) -> Decision {
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_used = now;
            return match &e.verdict {
                Some(Err(err)) => Decision::Deny(err.clone()),
                _ => {
                    for (name, cost) in new.costs {
                        // A hit allocates nothing: the metric name is copied only once.
                        match e.pending.get_mut(name) {
                            // Saturating: costs come from the config (bounded when loaded).
                            Some(total) => *total = total.saturating_add(*cost),
                            None => {
                                e.pending.insert(name.clone(), *cost);
                            }
                        }
                    }
                    Decision::Allow
                }
            };
        }
        let unit_cost: BTreeMap<String, i64> = new.costs.iter().cloned().collect();
        let entry = Entry {
            service: new.service.to_string(),
            config_id: new.config_id.to_string(),
            method_name: new.method_name.to_string(),
            consumer_id: (new.consumer_id)(),
            labels: (new.labels)(),
            unit_cost: unit_cost.clone(),
            pending: BTreeMap::new(),
            verdict: None,
            in_flight: true,
            last_used: now,
            last_sent: now,
        };
        let alloc = entry.allocation(&key, &unit_cost, "BEST_EFFORT");
        let cost = entry.cost(&key);
        if cost > self.max_bytes {
            // Could never fit: charge this request on its own, keep nothing.
            return Decision::AllowAndSend(alloc);
        }
        self.evict(now, Some(cost));
        self.bytes += cost;
        self.entries.insert(key, entry);
        Decision::AllowAndSend(alloc)
    }

    /// Allocations due at `now`: aggregated tokens of positive entries, and re-asks of
    /// negative ones. Marks them in flight.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Allocation> {
        self.evict(now, None);
        let refresh = self.refresh;
        let mut out = Vec::new();
        for (key, e) in self.entries.iter_mut() {
            if e.in_flight || now.duration_since(e.last_sent) < refresh {
                continue;
            }
            let alloc = match &e.verdict {
                Some(Err(_)) => e.allocation(key, &e.unit_cost, "NORMAL"),
                _ if !e.pending.is_empty() => {
                    let pending = std::mem::take(&mut e.pending);
                    e.allocation(key, &pending, "BEST_EFFORT")
                }
                _ => continue,
            };
            e.in_flight = true;
            e.last_sent = now;
            out.push(alloc);
        }
        out
    }

    /// Records an answer (`None` = the call failed: fail open).
    pub(crate) fn complete(&mut self, key: &str, verdict: Option<Result<(), EspError>>) {
        if let Some(e) = self.entries.get_mut(key) {
            e.in_flight = false;
            e.verdict = Some(verdict.unwrap_or(Ok(())));
        }
    }

    /// Bytes held, as [`Entry::cost`] counts them.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops expired entries; with `room_for`, also the least recently used until an entry of
    /// that many bytes fits under both bounds.
    fn evict(&mut self, now: Instant, room_for: Option<usize>) {
        let expiration = self.expiration;
        let mut freed = 0;
        self.entries.retain(|k, e| {
            let keep = e.in_flight || now.duration_since(e.last_used) <= expiration;
            if !keep {
                freed += e.cost(k);
            }
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
        let Some(cost) = room_for else { return };
        while self.entries.len() >= self.max_entries
            || self.bytes.saturating_add(cost) > self.max_bytes
        {
            let Some((k, e)) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
                .and_then(|k| self.entries.remove_entry(&k))
            else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(e.cost(&k));
        }
    }
}

/// One `:allocateQuota` call; its verdict goes back into the cache (none after a failure: quota
/// fails open).
pub(super) async fn send_allocation(inner: Arc<Inner>, alloc: Allocation) {
    inner.stats.send_quotas_by_flush.inc();
    let request = AllocateQuotaRequest {
        allocate_operation: alloc.operation,
        service_config_id: alloc.config_id,
    };
    let result: Result<AllocateQuotaResponse, _> = inner
        .transport
        .call(
            &alloc.service,
            "allocateQuota",
            QUOTA_CONTROLLER,
            &request,
            inner.opts.quota_timeout,
            inner.opts.quota_retries,
            // Envoy sends quota calls with no span: no trace context.
            None,
        )
        .await;
    let verdict = match result {
        Ok(resp) => {
            inner.saw_rollout(&resp.service_rollout_id);
            Some(verdict(&resp))
        }
        Err(failure) => {
            inner.stats.quota_failures.inc();
            tracing::warn!(service = %alloc.service, error = %failure, "allocateQuota failed; allowing traffic");
            None
        }
    };
    if let Ok(mut q) = inner.quota.for_key(&alloc.key).lock() {
        q.complete(&alloc.key, verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_entry<'a>(costs: &'a [(String, i64)]) -> NewEntry<'a> {
        NewEntry {
            service: "s",
            config_id: "c",
            method_name: "m",
            consumer_id: &|| "api_key:k".to_string(),
            labels: &BTreeMap::new,
            costs,
        }
    }

    #[test]
    fn first_allowed_then_aggregated_then_denied() {
        let costs = vec![("read-requests".to_string(), 2)];
        let mut q = QuotaCache::new(
            10,
            1 << 20,
            Duration::from_secs(1),
            Duration::from_secs(600),
        );
        let t0 = Instant::now();
        let key = signature("m", "api_key:k", &costs);
        let Decision::AllowAndSend(a) = q.decide(key.clone(), new_entry(&costs), t0) else {
            panic!("first request must be allowed and sent");
        };
        assert_eq!(
            a.operation.quota_metrics[0].metric_values[0].int64_value,
            Some(2)
        );
        assert!(matches!(
            q.decide(key.clone(), new_entry(&costs), t0),
            Decision::Allow
        ));
        assert!(matches!(
            q.decide(key.clone(), new_entry(&costs), t0),
            Decision::Allow
        ));
        // In flight: nothing due yet.
        assert!(q.due(t0 + Duration::from_secs(2)).is_empty());
        q.complete(&key, Some(Ok(())));
        let due = q.due(t0 + Duration::from_secs(2));
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0].operation.quota_metrics[0].metric_values[0].int64_value,
            Some(4)
        );
        q.complete(
            &key,
            Some(Err(quota_error_to_esp(
                "RESOURCE_EXHAUSTED",
                "Quota exceeded",
            ))),
        );
        match q.decide(key.clone(), new_entry(&costs), t0) {
            Decision::Deny(e) => {
                assert_eq!(
                    (e.http_status, e.code, e.message.as_str()),
                    (429, 8, "Quota exceeded")
                );
                assert_eq!(e.cause, Cause::Internal);
            }
            _ => panic!("denied after exhaustion"),
        }
        let due = q.due(t0 + Duration::from_secs(4));
        assert_eq!(due[0].operation.quota_mode, "NORMAL");
        q.complete(&key, None);
        assert!(
            matches!(q.decide(key, new_entry(&costs), t0), Decision::Allow),
            "fails open"
        );
    }

    /// Every distinct key and referer is a new signature; the byte bound holds however long
    /// the client makes them.
    #[test]
    fn cache_is_bounded_in_bytes() {
        let costs = vec![("reads".to_string(), 1)];
        let budget = 256 << 10;
        let mut q = QuotaCache::new(
            10_000,
            budget,
            Duration::from_secs(1),
            Duration::from_secs(600),
        );
        let t0 = Instant::now();
        let referer = "r".repeat(8_000);
        for i in 0..500u64 {
            let consumer = format!("api_key:{i:0128}");
            let key = format!("svc\u{0}cfg\u{0}{}", signature("m", &consumer, &costs));
            let labels = || {
                let mut l = BTreeMap::new();
                l.insert(
                    "servicecontrol.googleapis.com/referer".to_string(),
                    referer.clone(),
                );
                l
            };
            let new = NewEntry {
                service: "svc",
                config_id: "cfg",
                method_name: "m",
                consumer_id: &|| consumer.clone(),
                labels: &labels,
                costs: &costs,
            };
            assert!(matches!(
                q.decide(key, new, t0 + Duration::from_millis(i)),
                Decision::AllowAndSend(_)
            ));
            assert!(q.bytes() <= budget, "{} bytes after {i}", q.bytes());
        }
        assert!(
            q.len() < 500 && q.len() >= budget / 12_000,
            "{} entries",
            q.len()
        );
    }

    #[test]
    fn cache_key_is_service_config_and_signature() {
        let one = vec![("reads".to_string(), 1)];
        let two = vec![("writes".to_string(), 1), ("reads".to_string(), 3)];
        let two_swapped = vec![("reads".to_string(), 5), ("writes".to_string(), 1)];
        let input = |key: &'static str, costs: &'static [(String, i64)]| super::super::QuotaInput {
            service_name: "svc",
            service_config_id: "cfg",
            method_name: "m",
            api_key: key,
            producer_project_id: "prod",
            caller_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            referer: None,
            metric_costs: costs,
        };
        let one: &'static [(String, i64)] = Box::leak(one.into_boxed_slice());
        let two: &'static [(String, i64)] = Box::leak(two.into_boxed_slice());
        let two_swapped: &'static [(String, i64)] = Box::leak(two_swapped.into_boxed_slice());
        assert_eq!(
            cache_key(&input("K", one)),
            format!("svc\u{0}cfg\u{0}{}", signature("m", "api_key:K", one))
        );
        assert_eq!(
            cache_key(&input("", two)),
            format!("svc\u{0}cfg\u{0}{}", signature("m", "project:prod", two))
        );
        assert_eq!(
            cache_key(&input("K", two)),
            cache_key(&input("K", two_swapped)),
            "metric order and costs do not matter"
        );
        assert_ne!(cache_key(&input("K", one)), cache_key(&input("K", two)));
    }

    #[test]
    fn error_code_mapping() {
        let e = quota_error_to_esp("BILLING_NOT_ACTIVE", "d");
        assert_eq!((e.http_status, e.code), (403, 7));
        let e = quota_error_to_esp("API_KEY_EXPIRED", "d");
        assert_eq!((e.http_status, e.code), (400, 3));
        let e = quota_error_to_esp("WHATEVER", "d");
        assert_eq!((e.http_status, e.code), (500, 13));
    }
}
