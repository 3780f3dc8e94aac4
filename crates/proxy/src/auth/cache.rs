//! The verified-token cache: a token whose signature was checked is remembered until
//! min(`exp`, now + 300 s), so a hot token costs a hash lookup instead of a signature check.
//! Issuer and audience are still checked per method on every request (they depend on the
//! method's rules, not on the token alone). Bounded in entries and in bytes (a token can be as
//! long as a header line), oldest first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::jwt::ParsedJwt;

/// How long a verified token may be reused at most, like ESP's JWT cache.
pub const MAX_TOKEN_REUSE: Duration = Duration::from_secs(300);

/// A token whose signature and time claims were verified, with everything derived from it that
/// does not depend on the method.
#[derive(Debug)]
pub struct VerifiedToken {
    pub jwt: ParsedJwt,
    /// Which key source verified it (`jwks_uri` or `openid:<issuer>`); a hit only counts for a
    /// provider using the same source.
    pub key_source: String,
    /// Header value of `X-Endpoint-API-UserInfo`.
    pub user_info: http::HeaderValue,
    /// `jwtauth:issuer=...&audience=...` for reports.
    pub credential_id: String,
    /// Sorted, de-duplicated `aud` values.
    pub audiences: Vec<String>,
    /// Unix seconds after which the entry is dropped.
    valid_until: i64,
}

impl VerifiedToken {
    pub fn new(
        jwt: ParsedJwt,
        key_source: String,
        user_info: http::HeaderValue,
        credential_id: String,
        audiences: Vec<String>,
        now: i64,
    ) -> Self {
        let cap = now.saturating_add(MAX_TOKEN_REUSE.as_secs() as i64);
        let valid_until = jwt.exp.map_or(cap, |exp| exp.min(cap));
        VerifiedToken {
            jwt,
            key_source,
            user_info,
            credential_id,
            audiences,
            valid_until,
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

struct Inner {
    map: HashMap<Arc<str>, Arc<VerifiedToken>>,
    /// Insertion order, for FIFO eviction when full.
    order: VecDeque<Arc<str>>,
    /// Sum of [`cost`] over `map`.
    bytes: usize,
}

/// The bytes an entry holds, approximately: the token, its decoded payload (a JSON map, about
/// as large again) and the `X-Endpoint-API-UserInfo` value (the payload in base64), plus the
/// smaller strings and bookkeeping.
fn cost(token: &str, v: &VerifiedToken) -> usize {
    let audiences: usize = v.audiences.iter().map(|a| a.len() + 24).sum();
    256 + 3 * token.len() + v.key_source.len() + v.credential_id.len() + audiences
}

impl Inner {
    fn remove(&mut self, token: &str) {
        if let Some((k, v)) = self.map.remove_entry(token) {
            self.bytes = self.bytes.saturating_sub(cost(&k, &v));
        }
    }
}

/// Bounded, expiry-aware map from token to its verification result.
pub struct TokenCache {
    capacity: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl TokenCache {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        TokenCache {
            capacity,
            max_bytes,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each critical section leaves the map and queue consistent, so a poisoned lock is safe.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, token: &str, now: i64) -> Option<Arc<VerifiedToken>> {
        let mut inner = self.lock();
        let hit = inner.map.get(token)?.clone();
        if now >= hit.valid_until {
            inner.remove(token);
            return None;
        }
        Some(hit)
    }

    pub fn insert(&self, token: &str, verified: Arc<VerifiedToken>, now: i64) {
        let size = cost(token, &verified);
        if self.capacity == 0 || now >= verified.valid_until || size > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if inner.map.contains_key(token) {
            return;
        }
        let key: Arc<str> = Arc::from(token);
        inner.map.insert(key.clone(), verified);
        inner.bytes += size;
        inner.order.push_back(key);
        while inner.map.len() > self.capacity || inner.bytes > self.max_bytes {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            inner.remove(&old);
        }
        // Entries removed on expiry leave their name in `order`; keep the queue bounded.
        if inner.order.len() > self.capacity.saturating_mul(2) {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|k| map.contains_key(k));
        }
    }

    /// Bytes held, as the byte bound counts them.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    fn token(exp: i64) -> ParsedJwt {
        let t = format!(
            "{}.{}.s",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"i","exp":{exp}}}"#))
        );
        super::super::jwt::parse(&t).unwrap()
    }

    fn entry(exp: i64, now: i64) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken::new(
            token(exp),
            "u".into(),
            http::HeaderValue::from_static(""),
            String::new(),
            vec![],
            now,
        ))
    }

    #[test]
    fn entries_expire_at_exp_or_after_300s() {
        let c = TokenCache::new(10, 1 << 20);
        c.insert("a", entry(1_050, 1_000), 1_000);
        c.insert("b", entry(10_000, 1_000), 1_000);
        assert!(c.get("a", 1_049).is_some());
        assert!(c.get("a", 1_050).is_none());
        assert!(c.get("b", 1_299).is_some());
        assert!(c.get("b", 1_300).is_none());
    }

    #[test]
    fn capacity_is_bounded_oldest_first() {
        let c = TokenCache::new(2, 1 << 20);
        for name in ["a", "b", "c"] {
            c.insert(name, entry(10_000, 0), 0);
        }
        assert_eq!(c.len(), 2);
        assert!(c.get("a", 1).is_none());
        assert!(c.get("c", 1).is_some());
    }

    #[test]
    fn bytes_are_bounded_oldest_first() {
        let budget = 100 << 10;
        let c = TokenCache::new(10_000, budget);
        for i in 0..100 {
            // 8 KiB tokens, the longest a header line carries.
            let name = format!("{i:04}{}", "t".repeat(8 << 10));
            c.insert(&name, entry(10_000, 0), 0);
            assert!(c.bytes() <= budget, "{} bytes after {i}", c.bytes());
        }
        assert!(c.len() <= budget / (3 * (8 << 10)), "{} entries", c.len());
        assert!(c
            .get(&format!("{:04}{}", 99, "t".repeat(8 << 10)), 1)
            .is_some());
        assert!(c
            .get(&format!("{:04}{}", 0, "t".repeat(8 << 10)), 1)
            .is_none());
        // Expiry gives the bytes back.
        let c = TokenCache::new(10, budget);
        c.insert("short", entry(5, 0), 0);
        assert!(c.bytes() > 0);
        assert!(c.get("short", 5).is_none());
        assert_eq!(c.bytes(), 0);
    }
}
