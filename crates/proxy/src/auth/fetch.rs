//! The process-wide key cache: fetching key sets (and OpenID discovery documents), caching them
//! per URI and refreshing them in the background. A failed key fetch is not remembered, as in
//! ESP: the next request fetches again, so callers recover the moment the key server does.
//! Fetches of one URI are coalesced instead: requests that arrive while one is in flight wait
//! for it and share its outcome, so an outage under load costs one fetch per fetch time, not
//! one per request.
//!
//! Nothing is fetched at startup: a provider's keys are fetched the first time one of its tokens
//! is checked, so an unreachable JWKS only affects methods that accept that provider.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cache::TokenCache;
use super::keys::KeySet;

/// Largest key set or discovery document accepted.
pub const MAX_KEY_DOCUMENT_BYTES: usize = 1 << 20;

/// Why keys could not be obtained; `Display` is ESP's message (without the
/// `JWT validation failed: ` prefix).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("Unable to fetch verification key")]
    Unreachable,
    #[error("Unable to fetch verification key. HTTP response code: {0}")]
    HttpStatus(u16),
    #[error("Unable to fetch URI of the key via OpenID discovery")]
    DiscoveryFetch,
    #[error("Unable to parse URI of the key via OpenID discovery")]
    DiscoveryParse,
    #[error("Cannot determine the URI of the key")]
    DiscoveryRemembered,
}

/// Tuning for the key cache.
#[derive(Debug, Clone)]
pub struct KeyCacheOptions {
    /// How long fetched keys are fresh (`--jwks_cache_duration_in_s`, default 300 s).
    pub ttl: Duration,
    /// Per-fetch timeout (connect + response).
    pub fetch_timeout: Duration,
    /// While stale keys are served, how long after a failed background refresh the next one
    /// waits (requests are answered from the stale keys meanwhile, so nothing is refused).
    pub failure_ttl: Duration,
    /// Minimum spacing of refreshes forced by an unknown `kid`, per URI.
    pub kid_refresh_interval: Duration,
    /// Capacity of the verified-token cache.
    pub token_cache_capacity: usize,
    /// Bytes the verified-token cache may hold, whatever the entry count.
    pub token_cache_bytes: usize,
    /// Opening the connection to a key-set server may take this long at most (ESPv2's
    /// `--cluster_connect_timeout`, which bounds its JWKS clusters too); never more than
    /// `fetch_timeout`. `None`: `fetch_timeout`.
    pub connect_timeout: Option<Duration>,
    /// ESPv2's `--jwks_fetch_num_retries`: how many times a fetch that got no answer or a 5xx
    /// is made again (Envoy's JWKS retry policy: connect failure, reset, 5xx); 0 = never.
    pub fetch_retries: u32,
    /// Envoy's jittered exponential back-off between those tries
    /// (`--jwks_fetch_retry_back_off_{base,max}_interval_ms`, 200 ms and 32 s).
    pub retry_backoff_base: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for KeyCacheOptions {
    fn default() -> Self {
        KeyCacheOptions {
            ttl: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(5),
            failure_ttl: Duration::from_secs(5),
            kid_refresh_interval: Duration::from_secs(30),
            token_cache_capacity: 10_000,
            token_cache_bytes: 64 << 20,
            connect_timeout: None,
            fetch_retries: 0,
            retry_backoff_base: Duration::from_millis(200),
            retry_backoff_max: Duration::from_secs(32),
        }
    }
}

#[derive(Default)]
struct SlotState {
    keys: Option<(Arc<KeySet>, Instant)>,
    failure: Option<(FetchError, Instant)>,
    refreshing: bool,
    /// Fetches completed so far: a request that waited for the fetch lock and sees this moved
    /// takes the outcome of the fetch it waited for instead of fetching again.
    completed: u64,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// Serialises fetches of one URI so concurrent misses share one request.
    fetch: tokio::sync::Mutex<()>,
}

enum Discovery {
    Resolved(String, Instant),
    Failed(Instant),
}

/// Shared by every `Authenticator` of the process, so config swaps keep warm caches.
pub struct KeyCache {
    client: reqwest::Client,
    opts: KeyCacheOptions,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    discovery: Mutex<HashMap<String, Discovery>>,
    discovery_fetch: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
    pub(crate) tokens: TokenCache,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps inconsistent (every
    // critical section is a single insert/read), so poisoning is not a reason to fail requests.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KeyCache {
    pub fn new(opts: KeyCacheOptions) -> Arc<KeyCache> {
        let client = reqwest::Client::builder()
            .timeout(opts.fetch_timeout)
            .connect_timeout(
                opts.connect_timeout
                    .map_or(opts.fetch_timeout, |c| c.min(opts.fetch_timeout)),
            )
            .build()
            // Building only fails when the TLS backend cannot initialise; fall back to the
            // default client rather than panic.
            .unwrap_or_default();
        Arc::new(KeyCache {
            client,
            tokens: TokenCache::new(opts.token_cache_capacity, opts.token_cache_bytes),
            opts,
            slots: Mutex::new(HashMap::new()),
            discovery: Mutex::new(HashMap::new()),
            discovery_fetch: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    pub fn options(&self) -> &KeyCacheOptions {
        &self.opts
    }

    /// How many HTTP fetches (key sets and discovery documents) were made; for tests and metrics.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn slot(&self, uri: &str) -> Arc<Slot> {
        lock(&self.slots)
            .entry(uri.to_string())
            .or_default()
            .clone()
    }

    /// Keys for `uri`: fresh from the cache, stale while a background refresh runs, or fetched
    /// now (bounded by the fetch timeout), sharing a fetch already in flight.
    pub async fn keys(self: &Arc<Self>, uri: &str) -> Result<Arc<KeySet>, FetchError> {
        let slot = self.slot(uri);
        let seen = {
            let mut st = lock(&slot.state);
            if let Some((keys, at)) = &st.keys {
                let age = at.elapsed();
                if age < self.opts.ttl {
                    return Ok(keys.clone());
                }
                // Stale: keep serving for one more period while a refresh runs in the
                // background, so a slow JWKS never sits on the request path.
                if age < self.opts.ttl * 2 {
                    let keys = keys.clone();
                    // A refresh that just failed is not retried at request rate.
                    let failed_recently = st
                        .failure
                        .as_ref()
                        .is_some_and(|(_, at)| at.elapsed() < self.opts.failure_ttl);
                    if !st.refreshing && !failed_recently {
                        st.refreshing = true;
                        let this = self.clone();
                        let uri = uri.to_string();
                        let slot = slot.clone();
                        tokio::spawn(async move {
                            let _guard = slot.fetch.lock().await;
                            this.fetch_into(&uri, &slot).await.ok();
                            lock(&slot.state).refreshing = false;
                        });
                    }
                    return Ok(keys);
                }
            }
            st.completed
        };
        let _guard = slot.fetch.lock().await;
        {
            let st = lock(&slot.state);
            if let Some((keys, at)) = &st.keys {
                if at.elapsed() < self.opts.ttl {
                    return Ok(keys.clone());
                }
            }
            // A fetch finished while we waited for it: its failure is ours too. Requests that
            // arrive after it finished find `completed` already moved and fetch again.
            if st.completed != seen {
                if let Some((err, _)) = &st.failure {
                    return Err(err.clone());
                }
            }
        }
        self.fetch_into(uri, &slot).await
    }

    /// Re-fetches `uri` because a token named a kid we do not have (keys rotate), unless the
    /// last fetch is more recent than `kid_refresh_interval`. Returns the new set if fetched.
    pub async fn refresh_for_unknown_kid(self: &Arc<Self>, uri: &str) -> Option<Arc<KeySet>> {
        let slot = self.slot(uri);
        let recent = |st: &SlotState| {
            st.keys
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() < self.opts.kid_refresh_interval)
        };
        if recent(&lock(&slot.state)) {
            return None;
        }
        let _guard = slot.fetch.lock().await;
        if recent(&lock(&slot.state)) {
            return lock(&slot.state).keys.as_ref().map(|(k, _)| k.clone());
        }
        self.fetch_into(uri, &slot).await.ok()
    }

    async fn fetch_into(&self, uri: &str, slot: &Slot) -> Result<Arc<KeySet>, FetchError> {
        let traced = crate::trace::fetch_started();
        let got = self.get(uri).await;
        crate::trace::fetch_finished(traced);
        match got {
            Ok(body) => {
                let keys = Arc::new(KeySet::parse(&body));
                tracing::debug!(uri, keys = keys.keys.len(), "fetched verification keys");
                let mut st = lock(&slot.state);
                st.keys = Some((keys.clone(), Instant::now()));
                st.failure = None;
                st.completed += 1;
                Ok(keys)
            }
            Err(status) => {
                let err = match status {
                    Some(code) => FetchError::HttpStatus(code),
                    None => FetchError::Unreachable,
                };
                tracing::warn!(uri, error = %err, "verification key fetch failed");
                let mut st = lock(&slot.state);
                st.failure = Some((err.clone(), Instant::now()));
                st.completed += 1;
                // Keys past twice their TTL are no longer trusted once the source fails.
                if st
                    .keys
                    .as_ref()
                    .is_some_and(|(_, at)| at.elapsed() >= self.opts.ttl * 2)
                {
                    st.keys = None;
                }
                Err(err)
            }
        }
    }

    /// GET, made again on no answer or a 5xx up to `fetch_retries` times; `Err(Some(status))`
    /// for a non-success answer, `Err(None)` when unreachable.
    async fn get(&self, uri: &str) -> Result<bytes::Bytes, Option<u16>> {
        let mut retry = 0;
        loop {
            let outcome = self.get_once(uri).await;
            let retriable = matches!(outcome, Err(None) | Err(Some(500..=599)));
            if !retriable || retry >= self.opts.fetch_retries {
                return outcome;
            }
            retry += 1;
            let wait = crate::retry::jittered_backoff(
                retry,
                self.opts.retry_backoff_base,
                self.opts.retry_backoff_max,
            );
            tracing::debug!(uri, retry, ?wait, "key fetch failed; trying again");
            tokio::time::sleep(wait).await;
        }
    }

    async fn get_once(&self, uri: &str) -> Result<bytes::Bytes, Option<u16>> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let resp = self.client.get(uri).send().await.map_err(|e| {
            tracing::debug!(uri, error = %e, "fetch failed");
            None
        })?;
        let status = resp.status().as_u16();
        if status >= 300 {
            return Err(Some(status));
        }
        // Key sets are a few KiB; a body far larger is a misconfigured URL, not keys, and must
        // not be buffered without bound.
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|_| None)? {
            if body.len() + chunk.len() > MAX_KEY_DOCUMENT_BYTES {
                tracing::warn!(
                    uri,
                    limit = MAX_KEY_DOCUMENT_BYTES,
                    "key document too large"
                );
                return Err(None);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(bytes::Bytes::from(body))
    }

    /// The `jwks_uri` of an issuer by OpenID discovery. A failure is remembered for the key TTL
    /// (ESP remembered it for the process lifetime), answered with `Cannot determine the URI`.
    pub async fn discover(&self, issuer: &str) -> Result<String, FetchError> {
        let check = |this: &Self| -> Option<Result<String, FetchError>> {
            match lock(&this.discovery).get(issuer) {
                Some(Discovery::Resolved(uri, at)) if at.elapsed() < this.opts.ttl => {
                    Some(Ok(uri.clone()))
                }
                Some(Discovery::Failed(at)) if at.elapsed() < this.opts.ttl => {
                    Some(Err(FetchError::DiscoveryRemembered))
                }
                _ => None,
            }
        };
        if let Some(r) = check(self) {
            return r;
        }
        let _guard = self.discovery_fetch.lock().await;
        if let Some(r) = check(self) {
            return r;
        }
        let url = discovery_url(issuer);
        let result = match self.get(&url).await {
            Err(_) => Err(FetchError::DiscoveryFetch),
            Ok(body) => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("jwks_uri")?.as_str().map(str::to_owned))
                .filter(|u| !u.is_empty())
                .ok_or(FetchError::DiscoveryParse),
        };
        let entry = match &result {
            Ok(uri) => Discovery::Resolved(uri.clone(), Instant::now()),
            Err(e) => {
                tracing::warn!(issuer, error = %e, "OpenID discovery failed");
                Discovery::Failed(Instant::now())
            }
        };
        lock(&self.discovery).insert(issuer.to_string(), entry);
        result
    }
}

/// `<issuer, with https:// if it has no scheme, ending in />.well-known/openid-configuration`.
pub fn discovery_url(issuer: &str) -> String {
    let mut base = if issuer.starts_with("http://") || issuer.starts_with("https://") {
        issuer.to_string()
    } else {
        format!("https://{issuer}")
    };
    if !base.ends_with('/') {
        base.push('/');
    }
    base.push_str(".well-known/openid-configuration");
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_url_adds_scheme_and_slash() {
        assert_eq!(
            discovery_url("accounts.example.com"),
            "https://accounts.example.com/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("http://127.0.0.1:9/x/"),
            "http://127.0.0.1:9/x/.well-known/openid-configuration"
        );
    }

    #[test]
    fn fetch_error_messages_are_esps() {
        assert_eq!(
            FetchError::Unreachable.to_string(),
            "Unable to fetch verification key"
        );
        assert_eq!(
            FetchError::HttpStatus(404).to_string(),
            "Unable to fetch verification key. HTTP response code: 404"
        );
    }

    #[tokio::test]
    async fn unreachable_uri_is_tried_again_by_the_next_request() {
        // A port nobody listens on: bind then drop.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = KeyCache::new(KeyCacheOptions::default());
        let uri = format!("http://127.0.0.1:{port}/jwks");
        assert_eq!(cache.keys(&uri).await.unwrap_err(), FetchError::Unreachable);
        assert_eq!(cache.keys(&uri).await.unwrap_err(), FetchError::Unreachable);
        assert_eq!(
            cache.fetch_count(),
            2,
            "a failure is not answered from memory"
        );
    }

    /// A loopback server answering every GET with `status` and an empty JWKS; counts hits.
    async fn jwks_server(
        status: Arc<std::sync::atomic::AtomicU16>,
        hits: Arc<AtomicU64>,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                hits.fetch_add(1, Ordering::SeqCst);
                let code = status.load(Ordering::SeqCst);
                let body = r#"{"keys":[]}"#;
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}/jwks")
    }

    /// A loopback server answering with each status of `script` in turn (the last one
    /// forever); counts hits.
    async fn scripted_server(script: Vec<u16>, hits: Arc<AtomicU64>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let n = hits.fetch_add(1, Ordering::SeqCst) as usize;
                let code = script[n.min(script.len() - 1)];
                let body = r#"{"keys":[]}"#;
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}/jwks")
    }

    fn retrying(n: u32) -> KeyCacheOptions {
        KeyCacheOptions {
            fetch_retries: n,
            retry_backoff_base: Duration::from_millis(1),
            retry_backoff_max: Duration::from_millis(5),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn jwks_fetch_retries_cover_5xx_and_stop_at_the_limit() {
        // Two 503s then keys: two retries get the keys, one retry does not.
        let hits = Arc::new(AtomicU64::new(0));
        let uri = scripted_server(vec![503, 502, 200], hits.clone()).await;
        let cache = KeyCache::new(retrying(2));
        cache.keys(&uri).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 3);

        let hits = Arc::new(AtomicU64::new(0));
        let uri = scripted_server(vec![503, 503, 200], hits.clone()).await;
        let cache = KeyCache::new(retrying(1));
        assert_eq!(
            cache.keys(&uri).await.unwrap_err(),
            FetchError::HttpStatus(503)
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        // Without the flag (ESP, and ESPv2's default) one try only.
        let hits = Arc::new(AtomicU64::new(0));
        let uri = scripted_server(vec![500, 200], hits.clone()).await;
        let cache = KeyCache::new(KeyCacheOptions::default());
        assert!(cache.keys(&uri).await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn jwks_fetch_retries_skip_4xx_and_cover_refused_connections() {
        let hits = Arc::new(AtomicU64::new(0));
        let uri = scripted_server(vec![404, 200], hits.clone()).await;
        let cache = KeyCache::new(retrying(3));
        assert_eq!(
            cache.keys(&uri).await.unwrap_err(),
            FetchError::HttpStatus(404)
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "a 4xx is not retried");

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = KeyCache::new(retrying(3));
        let uri = format!("http://127.0.0.1:{port}/jwks");
        assert_eq!(cache.keys(&uri).await.unwrap_err(), FetchError::Unreachable);
        assert_eq!(cache.fetch_count(), 4, "one try and three retries");
    }

    #[tokio::test]
    async fn stale_keys_are_served_while_a_background_refresh_runs() {
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let hits = Arc::new(AtomicU64::new(0));
        let uri = jwks_server(status.clone(), hits.clone()).await;
        let cache = KeyCache::new(KeyCacheOptions {
            ttl: Duration::from_millis(300),
            failure_ttl: Duration::ZERO,
            ..Default::default()
        });
        cache.keys(&uri).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        // Past the TTL: answered at once from the stale set, refreshed behind the request.
        cache.keys(&uri).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "no background refresh");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Once the source fails and the keys are older than twice the TTL, they are dropped.
        status.store(500, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(650)).await;
        assert_eq!(
            cache.keys(&uri).await.unwrap_err(),
            FetchError::HttpStatus(500)
        );
    }

    #[tokio::test]
    async fn oversized_key_documents_are_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let len = MAX_KEY_DOCUMENT_BYTES + 1;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&vec![b'a'; len]).await;
            }
        });
        let cache = KeyCache::new(KeyCacheOptions::default());
        let err = cache.keys(&format!("http://{addr}/big")).await.unwrap_err();
        assert_eq!(err, FetchError::Unreachable);
    }
}
