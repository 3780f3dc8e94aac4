//! `:check` results: how a CheckResponse becomes "allowed" or an ESP error, the cache that
//! keeps most requests from waiting on the control plane, and the network half beside it: the
//! cache key, the CheckRequest, the call through `transport` and storing its verdict
//! (`impl Inner` at the end; [`super::ServiceControl::check`] decides when to call them).
//!
//! Cache policy (ESP's check aggregator, adapted):
//! * the key is every field that goes into the CheckRequest (service, config id, operation,
//!   API key and all labels: caller IP, referer, app identities), kept verbatim — a hash
//!   collision here would let one key ride on another's verdict;
//! * a positive verdict is reused; once it is older than the refresh interval the next request
//!   still uses it but starts one background re-check (ESP makes that request wait instead);
//! * a negative verdict is reused too; once per interval one request goes to the server;
//! * transport failures, HTTP errors and the "backend unavailable" check errors are never
//!   cached; entries idle past the expiration are evicted; the size is bounded in entries and in
//!   bytes (keys hold client-chosen strings: the key, referer and app identities), least
//!   recently used first.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use portico_servicecontrol::{labels, CheckRequest, CheckResponse, Operation};

use super::{report, CheckInput, CheckOk, Inner};
use crate::error::{Cause, Code, ErrorKind, EspError, KnownConsumer};
use crate::outbound_auth::SERVICE_CONTROLLER;

/// Numeric values of `google.api.servicecontrol.v1.CheckError.Code`, for the "unsupported
/// error code" message, which ESP prints as a number.
fn check_error_number(code: &str) -> Option<i32> {
    portico_servicecontrol::check_error::number(code)
}

/// Check errors that mean "a Google-side dependency is down": ESP lets the request through.
fn is_fail_open_check_error(code: &str) -> bool {
    matches!(
        code,
        "NAMESPACE_LOOKUP_UNAVAILABLE"
            | "SERVICE_STATUS_UNAVAILABLE"
            | "BILLING_STATUS_UNAVAILABLE"
            | "CLOUD_RESOURCE_MANAGER_BACKEND_UNAVAILABLE"
    )
}

/// The client-facing error for a check error code (ESP's catalogue, §2.3), or `None` when the
/// code lets the request through.
pub(crate) fn check_error_to_esp(code: &str, service: &str) -> Option<EspError> {
    if is_fail_open_check_error(code) {
        return None;
    }
    let sc = Cause::ServiceControl;
    let e = match code {
        "API_KEY_INVALID" => EspError::new(Code::InvalidArgument, "API key not valid. Please pass a valid API key.", sc),
        "API_KEY_EXPIRED" => EspError::new(Code::InvalidArgument, "API key expired. Please renew the API key.", sc),
        "API_KEY_NOT_FOUND" => {
            EspError::new(Code::InvalidArgument, "API key not found. Please pass a valid API key.", sc)
        }
        "NOT_FOUND" => EspError::new(
            Code::InvalidArgument,
            "Consumer project not found. Please pass a valid project.",
            sc,
        ),
        "PROJECT_INVALID" => EspError::new(
            Code::InvalidArgument,
            "Consumer project not valid. Please pass a valid project.",
            sc,
        ),
        "SERVICE_NOT_ACTIVATED" => EspError::new(
            Code::PermissionDenied,
            format!("API {service} is not enabled for the consumer project."),
            sc,
        ),
        "API_TARGET_BLOCKED" => EspError::new(
            Code::PermissionDenied,
            format!("API {service} is invalid for the consumer project."),
            sc,
        ),
        "PERMISSION_DENIED" => EspError::new(
            Code::PermissionDenied,
            format!("Consumer project doesn't have access to the API {service}"),
            sc,
        ),
        "RESOURCE_EXHAUSTED" => EspError::new(Code::PermissionDenied, "Quota check failed.", sc),
        "IP_ADDRESS_BLOCKED" => EspError::new(
            Code::PermissionDenied,
            "IP address is blocked by the API key with restrictions.",
            sc,
        ),
        "REFERER_BLOCKED" => EspError::new(
            Code::PermissionDenied,
            "Referer address is blocked by the API key with restrictions.",
            sc,
        ),
        "CLIENT_APP_BLOCKED" => EspError::new(
            Code::PermissionDenied,
            "Client application is blocked by the API key with restrictions.",
            sc,
        ),
        "PROJECT_DELETED" => EspError::new(Code::PermissionDenied, "Project has been deleted.", sc),
        "BILLING_DISABLED" => EspError::new(
            Code::PermissionDenied,
            format!("API {service} has billing disabled. Please enable it."),
            sc,
        ),
        "INVALID_CREDENTIAL" => {
            EspError::new(Code::PermissionDenied, "The credential in the request can not be verified", sc)
        }
        "CONSUMER_INVALID" => EspError::new(
            Code::PermissionDenied,
            "The consumer from the API key does not represent a valid consumer folder or organization",
            sc,
        ),
        other => {
            let shown = check_error_number(other)
                .map(|n| n.to_string())
                .unwrap_or_else(|| other.to_string());
            let e = EspError::new(
                Code::Internal,
                format!("Request blocked due to unsupported error code: {shown}"),
                sc,
            );
            return Some(e.with_kind(ErrorKind::CheckRefused {
                code: shown.into(),
                service: service.into(),
            }));
        }
    };
    let e = e.with_kind(ErrorKind::CheckRefused {
        code: code.into(),
        service: service.into(),
    });
    Some(e)
}

/// ESP's `ConvertCheckResponse` marks the key invalid only for the three API-key errors, and
/// the service not activated for `SERVICE_NOT_ACTIVATED`; after any other refusal the report
/// still carries the key and its consumer.
fn key_valid_despite(code: &str) -> bool {
    !matches!(
        code,
        "API_KEY_INVALID" | "API_KEY_EXPIRED" | "API_KEY_NOT_FOUND" | "SERVICE_NOT_ACTIVATED"
    )
}

/// What one remote check decided, and whether it may be cached.
pub(crate) struct Verdict {
    pub(crate) outcome: Result<CheckOk, EspError>,
    pub(crate) cacheable: bool,
}

/// What a check answered with a `*_UNAVAILABLE` error (a Service Control dependency down)
/// decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnavailableCheckError {
    /// ESP v1: let through, the key trusted.
    LetThrough,
    /// ESPv2 with the open network fail policy: let through, the key not checked.
    FailOpen,
    /// ESPv2 with the closed policy: refused, 503.
    FailClosed,
}

impl UnavailableCheckError {
    pub(crate) fn new(dialect: crate::dialect::Dialect, network_fail_open: bool) -> Self {
        match (
            dialect.unavailable_check_errors_follow_fail_policy(),
            network_fail_open,
        ) {
            (false, _) => UnavailableCheckError::LetThrough,
            (true, true) => UnavailableCheckError::FailOpen,
            (true, false) => UnavailableCheckError::FailClosed,
        }
    }
}

/// Interprets a 200 CheckResponse. Only the first error counts, as in ESP.
pub(crate) fn verdict_from_response(
    resp: &CheckResponse,
    service: &str,
    unavailable: UnavailableCheckError,
) -> Verdict {
    let consumer_project_number = resp
        .check_info
        .as_ref()
        .and_then(|i| i.consumer_info.as_ref())
        .map(|c| c.project_number)
        .filter(|n| *n != 0);
    let api_key_uid = resp
        .check_info
        .as_ref()
        .map(|i| i.api_key_uid.clone())
        .filter(|u| !u.is_empty());
    match resp.check_errors.first() {
        None => Verdict {
            outcome: Ok(CheckOk {
                consumer_project_number,
                api_key_valid: true,
                network_failure: false,
                api_key_uid,
            }),
            cacheable: true,
        },
        Some(err) => match check_error_to_esp(&err.code, service) {
            // A Google-side dependency was down: ask again next time, and meanwhile ...
            None => match unavailable {
                // ... allow, the key trusted (ESP v1) ...
                UnavailableCheckError::LetThrough => Verdict {
                    outcome: Ok(CheckOk {
                        consumer_project_number,
                        api_key_valid: true,
                        network_failure: false,
                        api_key_uid,
                    }),
                    cacheable: false,
                },
                // ... or as a check that got no answer (ESPv2): allowed only when fail-open,
                // the key not checked.
                UnavailableCheckError::FailOpen => Verdict {
                    outcome: Ok(CheckOk {
                        consumer_project_number: None,
                        api_key_valid: false,
                        network_failure: true,
                        api_key_uid: None,
                    }),
                    cacheable: false,
                },
                UnavailableCheckError::FailClosed => Verdict {
                    outcome: Err(EspError::new(
                        Code::Unavailable,
                        "One or more Google Service Control backends are unavailable.",
                        Cause::ServiceControl,
                    )
                    .with_kind(ErrorKind::CheckRefused {
                        code: err.code.clone().into(),
                        service: service.into(),
                    })),
                    cacheable: false,
                },
            },
            Some(mut e) => {
                if key_valid_despite(&err.code) {
                    e.known_consumer = Some(Box::new(KnownConsumer {
                        consumer_project_number,
                        api_key_uid,
                    }));
                }
                Verdict {
                    outcome: Err(e),
                    cacheable: true,
                }
            }
        },
    }
}

pub(crate) struct Entry {
    pub(crate) outcome: Result<CheckOk, EspError>,
    pub(crate) checked_at: Instant,
    pub(crate) last_used: Instant,
    /// A re-check for this key is in flight; nobody else starts one.
    pub(crate) refreshing: bool,
}

/// What the caller should do after looking a key up.
pub(crate) enum Lookup {
    /// Use this verdict; nothing else to do.
    Hit(Result<CheckOk, EspError>),
    /// Use this (positive) verdict and start a background re-check.
    HitAndRefresh(CheckOk),
    /// Ask the server now and wait for it.
    Miss,
}

/// What an entry costs besides its strings: the map slot, the key's and the entry's headers.
const ENTRY_OVERHEAD: usize = 64 + std::mem::size_of::<String>() + std::mem::size_of::<Entry>();

/// The bytes an entry holds, approximately: what the byte bound counts.
fn entry_cost(key: &str, outcome: &Result<CheckOk, EspError>) -> usize {
    let outcome = match outcome {
        Ok(ok) => ok.api_key_uid.as_ref().map_or(0, String::len),
        Err(e) => e.message.len(),
    };
    ENTRY_OVERHEAD + key.len() + outcome
}

pub(crate) struct CheckCache {
    /// foldhash, seeded per map: the keys hold API keys a client chooses, and a lookup is
    /// paid on every request (SipHash was ~0.7 % of a request's CPU).
    entries: HashMap<String, Entry, foldhash::fast::RandomState>,
    max_entries: usize,
    max_bytes: usize,
    /// Sum of [`entry_cost`] over the entries.
    bytes: usize,
    refresh: Duration,
    expiration: Duration,
    /// Fail-open: a verdict whose re-check failed keeps serving. Fail-closed: it is dropped,
    /// so the next request checks synchronously and is refused while Service Control is down
    /// (as ESP refuses once the flush interval has passed).
    keep_on_failure: bool,
}

impl CheckCache {
    pub(crate) fn new(
        max_entries: usize,
        max_bytes: usize,
        refresh: Duration,
        expiration: Duration,
        keep_on_failure: bool,
    ) -> Self {
        CheckCache {
            entries: HashMap::default(),
            max_entries,
            max_bytes,
            bytes: 0,
            refresh,
            expiration,
            keep_on_failure,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes held, as [`entry_cost`] counts them.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, key: &str) {
        if let Some((k, e)) = self.entries.remove_entry(key) {
            self.bytes = self.bytes.saturating_sub(entry_cost(&k, &e.outcome));
        }
    }

    pub(crate) fn lookup(&mut self, key: &str, now: Instant) -> Lookup {
        let Some(e) = self.entries.get_mut(key) else {
            return Lookup::Miss;
        };
        if now.duration_since(e.last_used) > self.expiration {
            self.remove(key);
            return Lookup::Miss;
        }
        e.last_used = now;
        let stale = now.duration_since(e.checked_at) >= self.refresh;
        match &e.outcome {
            Ok(ok) if stale && !e.refreshing => {
                e.refreshing = true;
                Lookup::HitAndRefresh(ok.clone())
            }
            Ok(ok) => Lookup::Hit(Ok(ok.clone())),
            Err(_) if stale && !e.refreshing => {
                // This request asks the server; the others keep getting the cached error.
                e.refreshing = true;
                Lookup::Miss
            }
            Err(err) => Lookup::Hit(Err(err.clone())),
        }
    }

    /// Records the result of a remote check for `key`.
    pub(crate) fn complete(&mut self, key: &str, verdict: &Verdict, now: Instant) {
        if verdict.cacheable {
            let last_used = self.entries.get(key).map(|e| e.last_used).unwrap_or(now);
            self.remove(key);
            let cost = entry_cost(key, &verdict.outcome);
            if cost > self.max_bytes {
                // Could never fit: answer from this verdict, keep nothing.
                return;
            }
            self.make_room(now, cost);
            self.bytes += cost;
            self.entries.insert(
                key.to_string(),
                Entry {
                    outcome: verdict.outcome.clone(),
                    checked_at: now,
                    last_used,
                    refreshing: false,
                },
            );
        } else if !self.keep_on_failure {
            self.remove(key);
        } else if let Some(e) = self.entries.get_mut(key) {
            // Not cacheable (network trouble): keep the last real verdict, and try again only
            // after another interval rather than on every request.
            e.checked_at = now;
            e.refreshing = false;
        }
    }

    /// Makes room for one more entry of `cost` bytes.
    fn make_room(&mut self, now: Instant, cost: usize) {
        let full = |c: &Self| {
            c.entries.len() >= c.max_entries || c.bytes.saturating_add(cost) > c.max_bytes
        };
        if !full(self) {
            return;
        }
        self.evict_expired(now);
        // Full of live entries: drop the least recently used. O(n) each, but only on overflow.
        while full(self) {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }

    pub(crate) fn evict_expired(&mut self, now: Instant) {
        let expiration = self.expiration;
        let mut freed = 0;
        self.entries.retain(|k, e| {
            let keep = now.duration_since(e.last_used) <= expiration;
            if !keep {
                freed += entry_cost(k, &e.outcome);
            }
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
    }
}

/// Every input that reaches the CheckRequest (the labels are derived from exactly these plus
/// constants), kept verbatim: building the key costs no request construction on a hit.
pub(super) fn cache_key(input: &CheckInput<'_>) -> String {
    let mut k = String::with_capacity(160);
    for part in [
        input.service_name,
        input.service_config_id,
        input.operation_name,
        input.api_key,
    ] {
        k.push_str(part);
        k.push('\u{0}');
    }
    // The address's bytes, one char each after a family tag: fixed length per family, so
    // unambiguous, and no text formatting on the request path.
    match input.caller_ip {
        IpAddr::V4(a) => {
            k.push('4');
            k.extend(a.octets().map(char::from));
        }
        IpAddr::V6(a) => {
            k.push('6');
            k.extend(a.octets().map(char::from));
        }
    }
    for part in [
        input.referer,
        input.android_package,
        input.android_cert,
        input.ios_bundle,
    ] {
        // Absent and empty are the same label set (empty labels are not sent).
        k.push('\u{0}');
        k.push_str(part.unwrap_or(""));
    }
    k
}

impl Inner {
    pub(super) fn check_request(&self, input: &CheckInput<'_>) -> CheckRequest {
        let mut l = BTreeMap::new();
        l.insert(labels::CALLER_IP.to_string(), input.caller_ip.to_string());
        l.insert(
            labels::SERVICE_AGENT.to_string(),
            self.statics.service_agent.clone(),
        );
        l.insert(
            labels::USER_AGENT.to_string(),
            self.statics.user_agent.to_string(),
        );
        let optional = [
            (labels::REFERER, input.referer),
            (labels::ANDROID_PACKAGE_NAME, input.android_package),
            (labels::ANDROID_CERT_FINGERPRINT, input.android_cert),
            (labels::IOS_BUNDLE_ID, input.ios_bundle),
        ];
        for (name, value) in optional {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                l.insert(name.to_string(), v.to_string());
            }
        }
        let now = report::now_rfc3339();
        CheckRequest {
            service_config_id: input.service_config_id.to_string(),
            operation: Operation {
                operation_id: uuid::Uuid::new_v4().to_string(),
                operation_name: input.operation_name.to_string(),
                consumer_id: format!("api_key:{}", input.api_key),
                start_time: now.clone(),
                end_time: now,
                labels: l,
                ..Default::default()
            },
        }
    }

    /// `context`: the request's trace context (ESPv2), written on each attempt.
    pub(super) async fn remote_check(
        &self,
        service: &str,
        request: &CheckRequest,
        context: Option<&crate::trace::CallTrace>,
    ) -> Verdict {
        let result: Result<CheckResponse, _> = self
            .transport
            .call(
                service,
                "check",
                SERVICE_CONTROLLER,
                request,
                self.opts.check_timeout,
                self.opts.check_retries,
                context,
            )
            .await;
        match result {
            Ok(resp) => {
                self.saw_rollout(&resp.service_rollout_id);
                verdict_from_response(
                    &resp,
                    service,
                    UnavailableCheckError::new(self.opts.dialect, self.opts.network_fail_open),
                )
            }
            Err(failure) => {
                self.stats.check_failures.inc();
                let open = self.opts.network_fail_open && failure.may_fail_open(self.opts.dialect);
                tracing::warn!(
                    %service,
                    error = %failure,
                    fail_open = open,
                    "Service Control check failed"
                );
                Verdict {
                    outcome: if open {
                        Ok(CheckOk {
                            consumer_project_number: None,
                            api_key_valid: false,
                            network_failure: true,
                            api_key_uid: None,
                        })
                    } else {
                        Err(failure.to_esp_error())
                    },
                    cacheable: false,
                }
            }
        }
    }

    pub(super) fn complete_check(&self, key: &str, verdict: &Verdict) {
        let stored = match self.checks.for_key(key).lock() {
            Ok(mut c) if c.enabled() => {
                c.complete(key, verdict, Instant::now());
                true
            }
            _ => false,
        };
        if stored {
            self.stats
                .check_cache_entries
                .set(self.check_cache_len() as i64);
        }
    }

    pub(super) fn check_cache_len(&self) -> usize {
        self.checks
            .iter()
            .filter_map(|c| c.lock().ok().map(|c| c.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_cache_key_tells_every_input_apart() {
        let base = CheckInput {
            service_name: "s",
            service_config_id: "c",
            operation_name: "op",
            api_key: "k",
            caller_ip: "10.0.0.1".parse().unwrap(),
            referer: None,
            android_package: None,
            android_cert: None,
            ios_bundle: None,
            trace: None,
            context: None,
        };
        let key = |f: &dyn Fn(&mut CheckInput<'static>)| {
            let mut i = base.clone();
            f(&mut i);
            cache_key(&i)
        };
        let variants = [
            key(&|_| {}),
            key(&|i| i.caller_ip = "10.0.0.2".parse().unwrap()),
            key(&|i| i.caller_ip = "0.0.0.0".parse().unwrap()),
            key(&|i| i.caller_ip = "::ffff:10.0.0.1".parse().unwrap()),
            key(&|i| i.caller_ip = "::".parse().unwrap()),
            key(&|i| i.api_key = "k2"),
            key(&|i| i.operation_name = "op2"),
            key(&|i| i.service_config_id = "c2"),
            key(&|i| i.referer = Some("r")),
            key(&|i| i.android_package = Some("r")),
            key(&|i| i.android_cert = Some("r")),
            key(&|i| i.ios_bundle = Some("r")),
        ];
        for (a, ka) in variants.iter().enumerate() {
            for kb in &variants[a + 1..] {
                assert_ne!(ka, kb);
            }
        }
        assert_eq!(
            key(&|_| {}),
            variants[0],
            "the same inputs give the same key"
        );
        // Absent and empty are one label set.
        assert_eq!(key(&|i| i.referer = Some("")), variants[0]);
    }
    use portico_servicecontrol::{CheckError, CheckInfo, ConsumerInfo};

    fn ok() -> CheckOk {
        CheckOk {
            consumer_project_number: Some(7),
            api_key_valid: true,
            network_failure: false,
            api_key_uid: None,
        }
    }

    #[test]
    fn every_catalogue_row_has_its_exact_message() {
        let svc = "echo.example.com";
        let rows: &[(&str, u16, i32, &str)] = &[
            ("API_KEY_INVALID", 400, 3, "API key not valid. Please pass a valid API key."),
            ("API_KEY_EXPIRED", 400, 3, "API key expired. Please renew the API key."),
            ("API_KEY_NOT_FOUND", 400, 3, "API key not found. Please pass a valid API key."),
            ("NOT_FOUND", 400, 3, "Consumer project not found. Please pass a valid project."),
            ("PROJECT_INVALID", 400, 3, "Consumer project not valid. Please pass a valid project."),
            ("SERVICE_NOT_ACTIVATED", 403, 7, "API echo.example.com is not enabled for the consumer project."),
            ("API_TARGET_BLOCKED", 403, 7, "API echo.example.com is invalid for the consumer project."),
            ("PERMISSION_DENIED", 403, 7, "Consumer project doesn't have access to the API echo.example.com"),
            ("RESOURCE_EXHAUSTED", 403, 7, "Quota check failed."),
            ("IP_ADDRESS_BLOCKED", 403, 7, "IP address is blocked by the API key with restrictions."),
            ("REFERER_BLOCKED", 403, 7, "Referer address is blocked by the API key with restrictions."),
            ("CLIENT_APP_BLOCKED", 403, 7, "Client application is blocked by the API key with restrictions."),
            ("PROJECT_DELETED", 403, 7, "Project has been deleted."),
            ("BILLING_DISABLED", 403, 7, "API echo.example.com has billing disabled. Please enable it."),
            ("INVALID_CREDENTIAL", 403, 7, "The credential in the request can not be verified"),
            ("CONSUMER_INVALID", 403, 7, "The consumer from the API key does not represent a valid consumer folder or organization"),
            ("ABUSER_DETECTED", 500, 13, "Request blocked due to unsupported error code: 103"),
            ("SOMETHING_NEW", 500, 13, "Request blocked due to unsupported error code: SOMETHING_NEW"),
        ];
        for (code, http, c, msg) in rows {
            let e = check_error_to_esp(code, svc).expect("blocked");
            assert_eq!(
                (e.http_status, e.code, e.message.as_str()),
                (*http, *c, *msg),
                "{code}"
            );
            assert_eq!(e.cause, Cause::ServiceControl);
        }
        for code in [
            "NAMESPACE_LOOKUP_UNAVAILABLE",
            "SERVICE_STATUS_UNAVAILABLE",
            "BILLING_STATUS_UNAVAILABLE",
            "CLOUD_RESOURCE_MANAGER_BACKEND_UNAVAILABLE",
        ] {
            assert!(check_error_to_esp(code, svc).is_none(), "{code} fails open");
        }
    }

    #[test]
    fn verdict_reads_consumer_and_first_error() {
        let resp = CheckResponse {
            check_info: Some(CheckInfo {
                consumer_info: Some(ConsumerInfo {
                    project_number: 42,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = verdict_from_response(&resp, "s", UnavailableCheckError::LetThrough);
        assert!(v.cacheable);
        assert_eq!(v.outcome.expect("ok").consumer_project_number, Some(42));
        let resp = CheckResponse {
            check_errors: vec![CheckError {
                code: "SERVICE_STATUS_UNAVAILABLE".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = verdict_from_response(&resp, "s", UnavailableCheckError::LetThrough);
        assert!(v.outcome.is_ok() && !v.cacheable);
    }

    #[test]
    fn unavailable_check_errors_follow_the_dialect_and_the_fail_policy() {
        use crate::dialect::Dialect;
        let resp = CheckResponse {
            check_errors: vec![CheckError {
                code: "BILLING_STATUS_UNAVAILABLE".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let esp = UnavailableCheckError::new(Dialect::Esp, false);
        assert_eq!(esp, UnavailableCheckError::LetThrough);
        let ok = verdict_from_response(&resp, "s", esp)
            .outcome
            .expect("through");
        assert!(ok.api_key_valid && !ok.network_failure);
        let open = UnavailableCheckError::new(Dialect::EspV2, true);
        let v = verdict_from_response(&resp, "s", open);
        let ok = v.outcome.expect("through when open");
        assert!(!ok.api_key_valid && ok.network_failure && !v.cacheable);
        let closed = UnavailableCheckError::new(Dialect::EspV2, false);
        let v = verdict_from_response(&resp, "s", closed);
        assert!(!v.cacheable);
        let e = v.outcome.expect_err("refused when closed");
        assert_eq!(e.code, Code::Unavailable as i32);
        assert_eq!(
            crate::service_control::ApiKeyState::after_check(&Err(e)),
            crate::service_control::ApiKeyState::NotChecked
        );
        // Which HTTP answers the open policy forgives.
        for s in [429, 502, 503, 504] {
            assert!(Dialect::EspV2.check_failure_may_fail_open(Some(s)), "{s}");
        }
        for s in [400, 403, 500, 501, 505] {
            assert!(!Dialect::EspV2.check_failure_may_fail_open(Some(s)), "{s}");
        }
        assert!(Dialect::Esp.check_failure_may_fail_open(Some(500)));
        assert!(!Dialect::Esp.check_failure_may_fail_open(Some(429)));
        assert!(Dialect::EspV2.check_failure_may_fail_open(None));
    }

    #[test]
    fn a_refusal_keeps_the_consumer_unless_the_key_or_service_was_at_fault() {
        let refused = |code: &str| {
            let resp = CheckResponse {
                check_errors: vec![CheckError {
                    code: code.into(),
                    ..Default::default()
                }],
                check_info: Some(CheckInfo {
                    consumer_info: Some(ConsumerInfo {
                        project_number: 42,
                        ..Default::default()
                    }),
                    api_key_uid: "uid-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            verdict_from_response(&resp, "s", UnavailableCheckError::LetThrough)
                .outcome
                .expect_err("refused")
                .known_consumer
        };
        let known = Some(Box::new(KnownConsumer {
            consumer_project_number: Some(42),
            api_key_uid: Some("uid-1".into()),
        }));
        for code in [
            "API_TARGET_BLOCKED",
            "PROJECT_INVALID",
            "PROJECT_DELETED",
            "NOT_FOUND",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "IP_ADDRESS_BLOCKED",
            "REFERER_BLOCKED",
            "CLIENT_APP_BLOCKED",
            "BILLING_DISABLED",
            "INVALID_CREDENTIAL",
            "CONSUMER_INVALID",
            // Unsupported codes (another spelling included: the names are case-sensitive)
            // are refused as such, and ESP keeps the key then.
            "SOMETHING_NEW",
            "api_key_invalid",
        ] {
            assert_eq!(refused(code), known, "{code}");
        }
        for code in [
            "API_KEY_INVALID",
            "API_KEY_EXPIRED",
            "API_KEY_NOT_FOUND",
            "SERVICE_NOT_ACTIVATED",
        ] {
            assert_eq!(refused(code), None, "{code}");
        }
    }

    #[test]
    fn cache_refreshes_positive_in_background_and_negative_once() {
        let mut c = CheckCache::new(
            10,
            1 << 20,
            Duration::from_secs(60),
            Duration::from_secs(300),
            true,
        );
        let t0 = Instant::now();
        assert!(matches!(c.lookup("k", t0), Lookup::Miss));
        c.complete(
            "k",
            &Verdict {
                outcome: Ok(ok()),
                cacheable: true,
            },
            t0,
        );
        assert!(matches!(
            c.lookup("k", t0 + Duration::from_secs(1)),
            Lookup::Hit(Ok(_))
        ));
        let t1 = t0 + Duration::from_secs(61);
        assert!(matches!(c.lookup("k", t1), Lookup::HitAndRefresh(_)));
        // Only one refresh at a time.
        assert!(matches!(c.lookup("k", t1), Lookup::Hit(Ok(_))));

        let err = EspError::new(Code::InvalidArgument, "bad", Cause::ServiceControl);
        c.complete(
            "n",
            &Verdict {
                outcome: Err(err),
                cacheable: true,
            },
            t0,
        );
        assert!(matches!(c.lookup("n", t0), Lookup::Hit(Err(_))));
        assert!(matches!(c.lookup("n", t1), Lookup::Miss));
        assert!(matches!(c.lookup("n", t1), Lookup::Hit(Err(_))));
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let mut c = CheckCache::new(
            2,
            1 << 20,
            Duration::from_secs(60),
            Duration::from_secs(300),
            true,
        );
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            c.complete(
                k,
                &Verdict {
                    outcome: Ok(ok()),
                    cacheable: true,
                },
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(c.len(), 2);
        assert!(
            matches!(c.lookup("a", t0), Lookup::Miss),
            "least recently used evicted"
        );
        assert!(
            matches!(c.lookup("c", t0 + Duration::from_secs(400)), Lookup::Miss),
            "expired"
        );
    }

    /// 1,000 unique 200 kB keys (what the issue sent) would have held ~200 MB; the byte bound
    /// keeps the cache under its budget however long the keys, and evicts the least recently
    /// used to stay there.
    #[test]
    fn cache_is_bounded_in_bytes() {
        let budget = 1 << 20;
        let mut c = CheckCache::new(
            10_000,
            budget,
            Duration::from_secs(60),
            Duration::from_secs(300),
            true,
        );
        let t0 = Instant::now();
        let good = Verdict {
            outcome: Ok(ok()),
            cacheable: true,
        };
        for i in 0..1_000u64 {
            let key = format!("{i:08}{}", "k".repeat(200_000));
            c.complete(&key, &good, t0 + Duration::from_millis(i));
            assert!(c.bytes() <= budget, "{} bytes after {i}", c.bytes());
        }
        assert!(c.len() <= budget / 200_000, "{} entries", c.len());
        // The newest survived, the oldest went.
        let newest = format!("{:08}{}", 999, "k".repeat(200_000));
        assert!(matches!(c.lookup(&newest, t0), Lookup::Hit(Ok(_))));
        let oldest = format!("{:08}{}", 0, "k".repeat(200_000));
        assert!(matches!(c.lookup(&oldest, t0), Lookup::Miss));
        // One entry larger than the whole budget is answered but not kept.
        c.complete(&"x".repeat(2 << 20), &good, t0);
        assert!(c.bytes() <= budget);
        // Small keys: the entry bound still applies, and the byte count follows removals.
        let mut small = CheckCache::new(
            3,
            budget,
            Duration::from_secs(60),
            Duration::from_secs(300),
            true,
        );
        for k in ["a", "b", "c", "d"] {
            small.complete(k, &good, t0);
        }
        assert_eq!(small.len(), 3);
        small.evict_expired(t0 + Duration::from_secs(301));
        assert_eq!((small.len(), small.bytes()), (0, 0));
    }

    #[test]
    fn failed_recheck_keeps_verdict_only_when_fail_open() {
        let failed = Verdict {
            outcome: Err(EspError::new(
                Code::Unavailable,
                "down",
                Cause::ServiceControl,
            )),
            cacheable: false,
        };
        let good = Verdict {
            outcome: Ok(ok()),
            cacheable: true,
        };
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(61);
        for (open, kept) in [(true, true), (false, false)] {
            let mut c = CheckCache::new(
                10,
                1 << 20,
                Duration::from_secs(60),
                Duration::from_secs(300),
                open,
            );
            c.complete("k", &good, t0);
            assert!(matches!(c.lookup("k", t1), Lookup::HitAndRefresh(_)));
            c.complete("k", &failed, t1);
            let hit = matches!(c.lookup("k", t1), Lookup::Hit(Ok(_)));
            assert_eq!(hit, kept, "fail_open={open}");
        }
    }
}
