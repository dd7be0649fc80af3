//! The one backoff policy of warmpool: exponential, doubling per failure in a row from a base
//! up to a maximum, with "equal jitter" (a pause in [d/2, d]) so a fleet failing together
//! spreads out but never retries sooner than half the ceiling.
//!
//! Pure: the caller passes the failure count and the jitter, so the engine (which must stay
//! deterministic) derives its jitter from the pool name, while the agent and the benchmark
//! agents draw theirs at random. Used by the engine's provisioning backoff (which the Jenkins
//! pools share), the agent's reconnect loop and `warmpool bench`'s simulated agents.

use std::time::Duration;

/// An exponential backoff: the `n`th pause in a row is at most `min(max, base * 2^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first pause's ceiling.
    pub base: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max` (`max` below `base` is raised to it).
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    /// The ceiling of the `n`th pause in a row (`n` counts from 1; 0 is treated as 1).
    pub fn ceiling(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << n.saturating_sub(1).min(20))
            .min(self.max.max(self.base))
    }

    /// The `n`th pause in a row with equal jitter: `jitter` in [0, 1] picks a pause in
    /// [ceiling/2, ceiling] (values outside are clamped).
    pub fn pause(&self, n: u32, jitter: f64) -> Duration {
        let d = self.ceiling(n);
        d.mul_f64(0.5 + jitter.clamp(0.0, 1.0) * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

    #[test]
    fn doubles_from_the_base_up_to_the_maximum() {
        assert_eq!(B.ceiling(0), Duration::from_millis(100));
        assert_eq!(B.ceiling(1), Duration::from_millis(100));
        assert_eq!(B.ceiling(4), Duration::from_millis(800));
        assert_eq!(B.ceiling(8), Duration::from_secs(10));
        assert_eq!(B.ceiling(u32::MAX), Duration::from_secs(10));
        assert_eq!(B.pause(4, 1.0), Duration::from_millis(800));
        assert_eq!(B.pause(4, 0.0), Duration::from_millis(400));
    }

    proptest! {
        #[test]
        fn a_pause_stays_between_half_the_ceiling_and_the_ceiling(n in 0u32..64, j in -1.0f64..2.0) {
            let p = B.pause(n, j);
            prop_assert!(p <= B.ceiling(n));
            prop_assert!(p >= B.ceiling(n) / 2);
            prop_assert!(B.ceiling(n) <= B.ceiling(n + 1));
        }
    }
}
