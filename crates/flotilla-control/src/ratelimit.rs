//! Per-key token buckets: how the leader keeps one node's agent from turning into a stream of
//! Raft writes (heartbeats, status reports). Pure like the rest of this crate: the caller passes
//! the time (monotonic milliseconds), so tests drive the clock.

use std::collections::HashMap;
use std::hash::Hash;

/// A bucket of `burst` tokens refilled at `per_sec` tokens a second; each write takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_sec: u32,
}

/// Tokens are counted in thousandths, so that a refill of `per_sec` tokens a second is
/// `per_sec` thousandths a millisecond (integer arithmetic, no rounding drift).
const MILLI: u64 = 1000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    at_ms: u64,
}

/// Token buckets by key (node id). Buckets that are full again are forgotten once there are
/// many, so the map stays as small as the set of keys that wrote recently.
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: RateLimit,
    buckets: HashMap<K, Bucket>,
}

/// Beyond this many buckets, full ones are dropped before a new one is added.
const PRUNE_ABOVE: usize = 4096;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn capacity(&self) -> u64 {
        u64::from(self.limit.burst.max(1)) * MILLI
    }

    fn refilled(&self, b: Bucket, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(b.at_ms);
        let add = elapsed.saturating_mul(u64::from(self.limit.per_sec));
        b.milli.saturating_add(add).min(self.capacity())
    }

    /// Takes one token of `key` at `now_ms`. `Err` carries the milliseconds until the next
    /// token (the caller answers 429 with it); a refused call takes nothing.
    pub fn try_take(&mut self, key: &K, now_ms: u64) -> Result<(), u64> {
        let cap = self.capacity();
        if !self.buckets.contains_key(key) && self.buckets.len() >= PRUNE_ABOVE {
            self.prune(now_ms);
        }
        let current = match self.buckets.get(key) {
            Some(b) => self.refilled(*b, now_ms),
            None => cap,
        };
        if current < MILLI {
            let missing = MILLI - current;
            let per_ms = u64::from(self.limit.per_sec.max(1));
            return Err(missing.div_ceil(per_ms));
        }
        self.buckets.insert(
            key.clone(),
            Bucket {
                milli: current - MILLI,
                at_ms: now_ms,
            },
        );
        Ok(())
    }

    /// Forgets the buckets that have refilled completely (they behave like new ones).
    pub fn prune(&mut self, now_ms: u64) {
        let cap = self.capacity();
        let per_sec = u64::from(self.limit.per_sec);
        self.buckets.retain(|_, b| {
            let elapsed = now_ms.saturating_sub(b.at_ms);
            b.milli.saturating_add(elapsed.saturating_mul(per_sec)) < cap
        });
    }

    /// How many keys have a bucket (for tests and metrics).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit {
        burst: 3,
        per_sec: 2,
    };

    #[test]
    fn a_burst_then_the_refill_rate() {
        let mut l = RateLimiter::new(LIMIT);
        let k = "n1".to_string();
        for _ in 0..3 {
            assert_eq!(l.try_take(&k, 1000), Ok(()));
        }
        // Empty: the next token is 500 ms away at 2 tokens/s.
        assert_eq!(l.try_take(&k, 1000), Err(500));
        assert_eq!(l.try_take(&k, 1499), Err(1));
        assert_eq!(l.try_take(&k, 1500), Ok(()));
        assert_eq!(l.try_take(&k, 1500), Err(500));
        // A long pause refills only up to the burst.
        for _ in 0..3 {
            assert_eq!(l.try_take(&k, 100_000), Ok(()));
        }
        assert!(l.try_take(&k, 100_000).is_err());
    }

    #[test]
    fn refusals_take_nothing_and_keys_are_independent() {
        let mut l = RateLimiter::new(LIMIT);
        let (a, b) = ("a".to_string(), "b".to_string());
        for _ in 0..3 {
            l.try_take(&a, 0).expect("burst");
        }
        for _ in 0..100 {
            assert!(l.try_take(&a, 0).is_err());
        }
        // Hammering while empty does not push the next token further away.
        assert_eq!(l.try_take(&a, 500), Ok(()));
        assert_eq!(l.try_take(&b, 0), Ok(()));
    }

    #[test]
    fn sustained_rate_over_a_long_run_is_burst_plus_rate_times_time() {
        let mut l = RateLimiter::new(RateLimit {
            burst: 50,
            per_sec: 20,
        });
        let k = 7u32;
        // One attempt every millisecond for ten seconds.
        let granted = (0..10_000u64)
            .filter(|ms| l.try_take(&k, *ms).is_ok())
            .count();
        assert!(
            (50 + 200 - 1..=50 + 200).contains(&granted),
            "granted {granted}"
        );
    }

    #[test]
    fn full_buckets_are_pruned_and_a_clock_going_back_is_harmless() {
        let mut l = RateLimiter::new(LIMIT);
        l.try_take(&"x".to_string(), 10_000).expect("token");
        l.try_take(&"y".to_string(), 10_000).expect("token");
        assert_eq!(l.len(), 2);
        l.prune(10_000);
        assert_eq!(l.len(), 2, "not refilled yet");
        l.prune(20_000);
        assert!(l.is_empty());
        // An earlier time than the last one refills nothing (saturating).
        l.try_take(&"z".to_string(), 5_000).expect("token");
        l.try_take(&"z".to_string(), 4_000).expect("token");
        l.try_take(&"z".to_string(), 4_000).expect("token");
        assert!(l.try_take(&"z".to_string(), 3_000).is_err());
    }
}
