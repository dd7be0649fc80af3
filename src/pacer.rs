//! Provisioning rate limits backed by `governor`: one token bucket per pool
//! (`provisioning.perSecond` sustained, `provisioning.burst` at once).
//!
//! Implements the engine's [`Pacer`]; `maxConcurrent` is enforced by the engine itself because it
//! depends on agent states, not on time.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::engine::Pacer;
use crate::spec::PoolSpec;

/// A token bucket per pool.
#[derive(Default)]
pub struct GovernorPacer {
    limiters: HashMap<String, (f64, u32, DefaultDirectRateLimiter)>,
}

/// The governor quota for a rate and burst. Rates above one start per nanosecond (the finest
/// period governor has) get that period: no pool starts agents faster anyway.
pub fn quota(per_second: f64, burst: u32) -> Quota {
    let per = Duration::from_secs_f64(1.0 / per_second.max(1e-6)).max(Duration::from_nanos(1));
    Quota::with_period(per)
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"))
}

impl Pacer for GovernorPacer {
    fn configure(&mut self, pool: &str, spec: &PoolSpec) {
        let p = &spec.provisioning;
        if let Some((rate, burst, _)) = self.limiters.get(pool)
            && *rate == p.per_second
            && *burst == p.burst
        {
            return;
        }
        self.limiters.insert(
            pool.to_string(),
            (
                p.per_second,
                p.burst,
                RateLimiter::direct(quota(p.per_second, p.burst)),
            ),
        );
    }

    fn try_acquire(&mut self, pool: &str) -> bool {
        match self.limiters.get(pool) {
            Some((_, _, l)) => l.check().is_ok(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz pass (tests/fuzz/pools.rs): a pools file with `perSecond: 1e12`
    /// validates, and configuring it panicked ("period is positive"): the period between
    /// starts rounded to zero nanoseconds.
    #[test]
    fn huge_rates_do_not_panic() {
        for rate in [1e9, 1e12, f64::MAX] {
            let mut p = GovernorPacer::default();
            let mut spec = PoolSpec::default();
            spec.provisioning.per_second = rate;
            spec.provisioning.burst = 2;
            p.configure("a", &spec);
            assert!(p.try_acquire("a"), "rate {rate}");
        }
    }

    #[test]
    fn burst_then_throttle() {
        let mut p = GovernorPacer::default();
        let mut spec = PoolSpec::default();
        spec.provisioning.per_second = 0.5;
        spec.provisioning.burst = 3;
        p.configure("a", &spec);
        let granted = (0..10).filter(|_| p.try_acquire("a")).count();
        assert_eq!(granted, 3);
        assert!(p.try_acquire("unknown"));
    }
}
