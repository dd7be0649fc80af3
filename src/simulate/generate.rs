//! Synthetic traces for `warmpool simulate --generate`: weekday office hours with a lunch dip,
//! a Monday-morning burst, a nightly batch, a flat random load. Arrivals are a Poisson process
//! whose rate follows the profile's time of week (thinning); job durations are log-normal in
//! minutes. Deterministic for a seed: the generator is a SplitMix64 of its own, so a trace does
//! not change with a dependency's version.
//!
//! Pure: returns a [`Trace`]; writing it is the caller's.

use std::time::{Duration, SystemTime};

use super::trace::{Trace, TraceLease};

/// The synthetic load shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Monday to Friday: quiet nights, a ramp from 07:00, the peak rate 08:00-12:00 and
    /// 13:00-17:00 with a lunch dip to 40 % at 12:00-13:00, a ramp down to 19:00; weekends at
    /// 2 % of the peak. Jobs of about 5 minutes (median).
    Weekday,
    /// The weekday shape at half the peak rate, plus a Monday-morning burst: 08:00-09:00 on
    /// Mondays at 3 times the peak rate (everyone pushes after the weekend).
    Burst,
    /// A nightly batch: 02:00-04:00 every day at the peak rate with longer jobs (about 15
    /// minutes), quiet otherwise (0.1 % of the peak rate: a rare manual run, about one every
    /// 100 minutes at the default rate).
    Nightly,
    /// A flat Poisson load at the peak rate, day and night.
    Flat,
}

/// Settings of a generator.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// The shape.
    pub profile: Profile,
    /// Weeks of traffic (from a Monday 00:00).
    pub weeks: u32,
    /// Seed of the generator.
    pub seed: u64,
    /// The selector of every lease.
    pub selector: String,
    /// Leases per minute at the profile's peak.
    pub rate_per_minute: f64,
    /// Wall time of the trace's start (written as its `# start:` comment).
    pub start: SystemTime,
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

const DAY: f64 = 86_400.0;
const HOUR: f64 = 3_600.0;

/// Linear ramp of `x` from 0 at `a` to 1 at `b` (hours).
fn ramp(x: f64, a: f64, b: f64) -> f64 {
    ((x - a) / (b - a)).clamp(0.0, 1.0)
}

/// Office hours as a fraction of the peak, by hour of day (fractional).
fn office(h: f64) -> f64 {
    let shape = if h < 7.0 {
        0.0
    } else if h < 8.0 {
        ramp(h, 7.0, 8.0)
    } else if h < 12.0 {
        1.0
    } else if h < 13.0 {
        0.4
    } else if h < 17.0 {
        1.0
    } else {
        1.0 - ramp(h, 17.0, 19.0)
    };
    // A trickle at night and in the evening (a few scheduled jobs, a colleague abroad).
    shape.max(0.05)
}

impl Profile {
    /// The arrival rate at `t` seconds after a Monday 00:00, as a fraction of the peak.
    pub fn shape(self, t: f64) -> f64 {
        let day = ((t / DAY).floor() as i64).rem_euclid(7);
        let h = (t % DAY) / HOUR;
        let weekday = day < 5;
        match self {
            Profile::Weekday if weekday => office(h),
            Profile::Weekday => 0.02,
            Profile::Burst => {
                let base = if weekday { 0.5 * office(h) } else { 0.01 };
                if day == 0 && (8.0..9.0).contains(&h) {
                    3.0
                } else {
                    base
                }
            }
            Profile::Nightly if (2.0..4.0).contains(&h) => 1.0,
            Profile::Nightly => 0.001,
            Profile::Flat => 1.0,
        }
    }

    /// The highest value of [`Profile::shape`].
    fn max_shape(self) -> f64 {
        match self {
            Profile::Burst => 3.0,
            _ => 1.0,
        }
    }

    /// Median job duration in seconds, and the spread (sigma of its logarithm).
    fn job(self, t: f64) -> (f64, f64) {
        let h = (t % DAY) / HOUR;
        match self {
            Profile::Nightly if (2.0..4.0).contains(&h) => (900.0, 0.6),
            _ => (300.0, 0.8),
        }
    }
}

/// Generates a trace.
pub fn generate(cfg: &GenConfig) -> Trace {
    let mut rng = Rng::new(cfg.seed);
    let end = f64::from(cfg.weeks) * 7.0 * DAY;
    let peak = cfg.rate_per_minute.max(0.0) / 60.0 * cfg.profile.max_shape();
    let mut leases = Vec::new();
    if peak > 0.0 {
        let mut t = 0.0;
        loop {
            // Candidates at the peak rate, kept with probability rate(t) / peak (thinning).
            t += -(1.0 - rng.unit()).ln() / peak;
            if t >= end {
                break;
            }
            let keep = cfg.profile.shape(t) / cfg.profile.max_shape();
            if rng.unit() >= keep {
                continue;
            }
            let (median, sigma) = cfg.profile.job(t);
            let d = (median * (sigma * rng.normal()).exp()).clamp(30.0, 4.0 * HOUR);
            leases.push(TraceLease {
                at: Duration::from_millis((t * 1000.0) as u64),
                selector: cfg.selector.clone(),
                duration: Duration::from_secs(d.round() as u64),
            });
        }
    }
    Trace {
        leases,
        start: Some(cfg.start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(profile: Profile, seed: u64) -> GenConfig {
        GenConfig {
            profile,
            weeks: 1,
            seed,
            selector: "linux".into(),
            rate_per_minute: 10.0,
            start: super::super::default_start(),
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        for p in [
            Profile::Weekday,
            Profile::Burst,
            Profile::Nightly,
            Profile::Flat,
        ] {
            let a = generate(&cfg(p, 7));
            assert_eq!(a, generate(&cfg(p, 7)), "{p:?}");
            assert_ne!(a, generate(&cfg(p, 8)), "{p:?}");
            assert!(a.leases.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(
                a.leases
                    .iter()
                    .all(|l| l.duration >= Duration::from_secs(30))
            );
        }
    }

    #[test]
    fn shapes_follow_the_profile() {
        let hour = |t: &Trace, day: u64, h: u64| {
            let from = Duration::from_secs(day * 86_400 + h * 3_600);
            t.leases
                .iter()
                .filter(|l| l.at >= from && l.at < from + Duration::from_secs(3_600))
                .count()
        };
        let w = generate(&cfg(Profile::Weekday, 1));
        // Tuesday 10:00 at the peak (about 600), lunch lower, Saturday quiet.
        assert!(hour(&w, 1, 10) > 450, "{}", hour(&w, 1, 10));
        assert!(hour(&w, 1, 12) < hour(&w, 1, 10) / 2 + 50);
        assert!(hour(&w, 5, 10) < 40);
        let b = generate(&cfg(Profile::Burst, 1));
        assert!(hour(&b, 0, 8) > 3 * hour(&b, 1, 8));
        let n = generate(&cfg(Profile::Nightly, 1));
        assert!(hour(&n, 2, 2) > 450);
        assert!(hour(&n, 2, 12) < 30);
        let f = generate(&cfg(Profile::Flat, 1));
        let total = f.leases.len() as f64;
        assert!((total / (7.0 * 24.0 * 600.0) - 1.0).abs() < 0.05, "{total}");
    }
}
