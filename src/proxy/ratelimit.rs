//! `envoy.filters.http.local_ratelimit` as Envoy 1.40 runs it (measured against it here):
//! - a token bucket per filter config (listener level) and per route config, shared by every
//!   worker; it starts full (`max_tokens`) and refills continuously at
//!   `tokens_per_fill / fill_interval` (Envoy 1.40 refills smoothly: after draining a bucket of
//!   10 per 1 s, a token came back every 100 ms, not 10 at once);
//! - `filter_enabled` decides per request whether the limiter is consulted at all and
//!   `filter_enforced` whether an empty bucket refuses the request; both default to 0%, so a
//!   config without them limits nothing;
//! - a refused request gets `429` (or `status`) with body `local_rate_limited` and the
//!   `response_headers_to_add`; no `x-envoy-ratelimited` header (Envoy 1.40 does not send it,
//!   whatever its docs say);
//! - a route's own config replaces the listener's (its bucket, headers and stat prefix);
//! - stats `<stat_prefix>.http_local_rate_limit.{enabled,enforced,ok,rate_limited,shadow_mode}`
//!   live as long as the proxy (by name, across config updates); buckets are new with each
//!   accepted config, as Envoy's are.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `<stat_prefix>.http_local_rate_limit.*`
#[derive(Debug, Default)]
pub struct RateLimitStats {
    pub enabled: AtomicU64,
    pub enforced: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub shadow_mode: AtomicU64,
}

impl RateLimitStats {
    pub fn counters(&self) -> [(&'static str, u64); 5] {
        [
            ("enabled", self.enabled.load(Relaxed)),
            ("enforced", self.enforced.load(Relaxed)),
            ("ok", self.ok.load(Relaxed)),
            ("rate_limited", self.rate_limited.load(Relaxed)),
            ("shadow_mode", self.shadow_mode.load(Relaxed)),
        ]
    }
}

/// The proxy's rate-limit stats by stat prefix (they outlive config updates).
#[derive(Debug, Default)]
pub struct Registry(Mutex<BTreeMap<String, Arc<RateLimitStats>>>);

impl Registry {
    pub fn get(&self, prefix: &str) -> Arc<RateLimitStats> {
        self.0
            .lock()
            .unwrap()
            .entry(prefix.to_string())
            .or_default()
            .clone()
    }

    pub fn all(&self) -> Vec<(String, Arc<RateLimitStats>)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A token bucket that refills continuously.
#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: f64,
    /// Tokens per second.
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// Full at the start. `fill_interval` is at least 50 ms (checked where configs are read).
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> TokenBucket {
        TokenBucket {
            max_tokens: f64::from(max_tokens),
            rate: f64::from(tokens_per_fill) / fill_interval.as_secs_f64(),
            state: Mutex::new((f64::from(max_tokens), Instant::now())),
        }
    }

    /// Takes a token if one is there.
    pub fn try_take(&self) -> bool {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap();
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.max_tokens);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One local rate limit config (a listener's filter config or a route's override).
#[derive(Debug)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    /// None: the config names no bucket, so it never refuses.
    pub bucket: Option<TokenBucket>,
    /// Parts per million of requests for which the limiter is consulted / enforced.
    pub enabled_ppm: u32,
    pub enforced_ppm: u32,
    pub status: u16,
    /// Added to refused responses: (name, value, append).
    pub response_headers: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub stats: Arc<RateLimitStats>,
}

/// What the filter decided for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Pass,
    /// Refuse with this status.
    Refuse(u16),
}

impl LocalRateLimit {
    pub fn decide(&self) -> Decision {
        if !chance(self.enabled_ppm) {
            return Decision::Pass;
        }
        self.stats.enabled.fetch_add(1, Relaxed);
        if self.bucket.as_ref().is_none_or(TokenBucket::try_take) {
            self.stats.ok.fetch_add(1, Relaxed);
            return Decision::Pass;
        }
        self.stats.rate_limited.fetch_add(1, Relaxed);
        if !chance(self.enforced_ppm) {
            return Decision::Pass;
        }
        self.stats.enforced.fetch_add(1, Relaxed);
        Decision::Refuse(self.status)
    }

    /// Adds the configured headers to a refused response.
    pub fn decorate(&self, headers: &mut http::HeaderMap) {
        for (k, v, append) in &self.response_headers {
            if *append {
                headers.append(k.clone(), v.clone());
            } else {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
}

fn chance(ppm: u32) -> bool {
    use rand::Rng;
    ppm >= 1_000_000 || (ppm > 0 && rand::rng().random_range(0..1_000_000) < ppm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(enabled: u32, enforced: u32) -> LocalRateLimit {
        LocalRateLimit {
            stat_prefix: "t".into(),
            bucket: Some(TokenBucket::new(3, 10, Duration::from_secs(1))),
            enabled_ppm: enabled,
            enforced_ppm: enforced,
            status: 429,
            response_headers: vec![],
            stats: Arc::default(),
        }
    }

    #[test]
    fn burst_then_continuous_refill() {
        let l = limiter(1_000_000, 1_000_000);
        let got: Vec<Decision> = (0..5).map(|_| l.decide()).collect();
        assert_eq!(
            got,
            [
                Decision::Pass,
                Decision::Pass,
                Decision::Pass,
                Decision::Refuse(429),
                Decision::Refuse(429)
            ]
        );
        // 10 per second: one token every 100 ms.
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(l.decide(), Decision::Pass);
        assert_eq!(l.decide(), Decision::Refuse(429));
        let s = l.stats.counters();
        assert_eq!(
            s,
            [
                ("enabled", 7),
                ("enforced", 3),
                ("ok", 4),
                ("rate_limited", 3),
                ("shadow_mode", 0)
            ]
        );
    }

    #[test]
    fn not_enabled_consults_nothing_and_not_enforced_only_counts() {
        let off = limiter(0, 1_000_000);
        assert!((0..10).all(|_| off.decide() == Decision::Pass));
        assert_eq!(off.stats.enabled.load(Relaxed), 0);
        let shadow = limiter(1_000_000, 0);
        assert!((0..10).all(|_| shadow.decide() == Decision::Pass));
        assert_eq!(shadow.stats.rate_limited.load(Relaxed), 7);
        assert_eq!(shadow.stats.enforced.load(Relaxed), 0);
    }
}
