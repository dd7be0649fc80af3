//! What the sizing policy learns per pool, and the headroom it derives from it.
//!
//! - The arrival rate of lease requests attributed to the pool, two ways: *recent* (an
//!   exponentially weighted rate with a [`RECENT_TAU`] time constant, updated in O(1) per
//!   request) and *by time of week* (2016 five-minute buckets, Monday 00:00 UTC first; each
//!   bucket's rate is blended across weeks with weight [`WEEK_ALPHA`] for the newest week). The
//!   time-of-week model needs the wall clock ([`super::Engine::set_wall_clock`]); without it only
//!   the recent rate is learned.
//! - The refill time: seconds from provisioning an agent to its registration (idle), an
//!   exponentially weighted mean of the pool's measurements (adopted agents excluded); before
//!   the first one, [`DEFAULT_REFILL`] (or the pool's `connectTimeout` when shorter).
//! - The headroom for a target warm-hit ratio ([`headroom`]): with `k` idle agents kept and one
//!   provisioned for each agent taken, the agents on their way number Poisson(rate x refill)
//!   (an M/G/infinity pipeline), and a request finds an idle agent when fewer than `k` are on
//!   their way. So the headroom is the smallest `k` with P(Poisson(rate x refill) < k) >= target.
//!
//! Pure: instants and wall-clock times are passed in; nothing here reads a clock.

use std::time::{Duration, Instant, SystemTime};

/// Time constant of the recent arrival rate.
pub const RECENT_TAU: Duration = Duration::from_secs(300);
/// Width of one time-of-week bucket.
pub const BUCKET: Duration = Duration::from_secs(300);
/// Buckets in a week.
pub const BUCKETS: usize = 7 * 24 * 12;
/// Weight of the newest week in a time-of-week bucket.
pub const WEEK_ALPHA: f64 = 0.5;
/// Refill time assumed before the pool's first measurement (capped by its `connectTimeout`).
pub const DEFAULT_REFILL: Duration = Duration::from_secs(30);
/// Weight of the newest refill measurement.
pub const REFILL_ALPHA: f64 = 0.2;
/// Below this expected rate (requests per second: one an hour) the forecast keeps no agent;
/// `minIdle` and schedules still do.
pub const MIN_RATE: f64 = 1.0 / 3600.0;

/// Per-pool learned state. O(1) per request and per measurement; advancing the time-of-week
/// clock costs one step per bucket passed (at most [`BUCKETS`] per call).
#[derive(Debug, Clone)]
pub struct Learner {
    /// Recent rate (per second) as of `rate_at`.
    rate: f64,
    rate_at: Option<Instant>,
    /// Blended rate (per second) per time-of-week bucket; NaN until the bucket was seen.
    week: Vec<f32>,
    /// The absolute bucket (UNIX seconds / bucket width) being counted, and its count.
    current: Option<u64>,
    count: u32,
    /// Mean provision-to-idle seconds, once measured.
    refill: Option<f64>,
    /// Headroom cache: (mean arrivals during a refill, target) -> headroom.
    memo: Option<(f64, f64, u32)>,
}

impl Default for Learner {
    fn default() -> Self {
        Learner {
            rate: 0.0,
            rate_at: None,
            week: vec![f32::NAN; BUCKETS],
            current: None,
            count: 0,
            refill: None,
            memo: None,
        }
    }
}

/// The time-of-week slot of an absolute bucket number: Monday 00:00 UTC is slot 0 (the UNIX
/// epoch was a Thursday).
fn slot(abs: u64) -> usize {
    let per_day = 86_400 / BUCKET.as_secs();
    ((abs + 3 * per_day) % BUCKETS as u64) as usize
}

fn abs_bucket(wall: SystemTime) -> Option<u64> {
    wall.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() / BUCKET.as_secs())
}

impl Learner {
    /// One lease request attributed to the pool at `now` (wall time `wall`, when known).
    pub fn arrival(&mut self, now: Instant, wall: Option<SystemTime>) {
        self.rate = self.recent_rate(now) + 1.0 / RECENT_TAU.as_secs_f64();
        self.rate_at = Some(now);
        if let Some(w) = wall {
            self.advance(w);
            self.count += 1;
        }
    }

    /// The recent rate (per second) at `now`.
    pub fn recent_rate(&self, now: Instant) -> f64 {
        match self.rate_at {
            Some(t) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                self.rate * (-dt / RECENT_TAU.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }

    /// Moves the time-of-week clock to `wall`: every bucket passed is folded into its slot
    /// (with the requests counted in it, zero for the ones passed without any). A clock that
    /// went back restarts counting at `wall`.
    pub fn advance(&mut self, wall: SystemTime) {
        let Some(abs) = abs_bucket(wall) else { return };
        match self.current {
            None => {
                self.current = Some(abs);
                self.count = 0;
            }
            Some(cur) if abs > cur => {
                self.fold(cur, self.count);
                let skipped = (abs - cur - 1).min(BUCKETS as u64);
                for b in (abs - skipped)..abs {
                    self.fold(b, 0);
                }
                self.current = Some(abs);
                self.count = 0;
            }
            Some(cur) if abs < cur => {
                self.current = Some(abs);
                self.count = 0;
            }
            Some(_) => {}
        }
    }

    fn fold(&mut self, abs: u64, count: u32) {
        let rate = count as f64 / BUCKET.as_secs_f64();
        let v = &mut self.week[slot(abs)];
        *v = if v.is_nan() {
            rate as f32
        } else {
            (WEEK_ALPHA * rate + (1.0 - WEEK_ALPHA) * f64::from(*v)) as f32
        };
    }

    /// The time-of-week rate expected over `[wall, wall + horizon]`: the highest of the buckets
    /// it touches that were learned (0 when none was).
    pub fn week_rate(&self, wall: SystemTime, horizon: Duration) -> f64 {
        let (Some(from), Some(to)) = (abs_bucket(wall), abs_bucket(wall + horizon)) else {
            return 0.0;
        };
        (from..=to.min(from + BUCKETS as u64))
            .map(|b| self.week[slot(b)])
            .filter(|v| !v.is_nan())
            .fold(0.0, |m, v| m.max(f64::from(v)))
    }

    /// The rate the headroom is sized for: the higher of the recent rate and the time-of-week
    /// rate over the next refill (a ramp seen last week is anticipated).
    pub fn expected_rate(&self, now: Instant, wall: Option<SystemTime>, refill: Duration) -> f64 {
        let recent = self.recent_rate(now);
        match wall {
            Some(w) => recent.max(self.week_rate(w, refill)),
            None => recent,
        }
    }

    /// One measured provision-to-idle time.
    pub fn refill_measured(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.refill = Some(match self.refill {
            None => seconds,
            Some(m) => REFILL_ALPHA * seconds + (1.0 - REFILL_ALPHA) * m,
        });
    }

    /// The refill time: the measured mean, else [`DEFAULT_REFILL`] capped by `connect_timeout`.
    pub fn refill(&self, connect_timeout: Duration) -> Duration {
        match self.refill {
            Some(s) => Duration::from_secs_f64(s),
            None => DEFAULT_REFILL.min(connect_timeout),
        }
    }

    /// [`headroom`], memoised while the mean moves by less than 1 % (the rate decays a little
    /// between every two events).
    pub fn headroom(&mut self, rate: f64, refill: Duration, target: f64, cap: u32) -> u32 {
        if rate < MIN_RATE {
            return 0;
        }
        let mean = rate * refill.as_secs_f64();
        if let Some((m, t, k)) = self.memo
            && t == target
            && (mean - m).abs() <= 0.01 * m
            && k <= cap
        {
            return k;
        }
        let k = headroom(mean, target, cap);
        if k < cap {
            self.memo = Some((mean, target, k));
        }
        k
    }
}

/// The smallest `k` (at most `cap`) with P(N < k) >= `target`, N ~ Poisson(`mean`): the idle
/// agents that keep the share of requests finding one at `target` when `mean` requests arrive
/// during one refill. O(k); the pmf is stepped in log space so a large mean does not underflow.
///
/// ```
/// use warmpool::engine::headroom;
/// assert_eq!(headroom(0.0, 0.95, 100), 1);
/// // Poisson(1): P(N <= 2) = 0.920, P(N <= 3) = 0.981.
/// assert_eq!(headroom(1.0, 0.95, 100), 4);
/// assert_eq!(headroom(1.0, 0.95, 2), 2);
/// ```
pub fn headroom(mean: f64, target: f64, cap: u32) -> u32 {
    if !(mean.is_finite() && mean >= 0.0) {
        return cap;
    }
    if mean == 0.0 {
        return 1.min(cap);
    }
    let ln_mean = mean.ln();
    let mut ln_p = -mean; // ln P(N = 0)
    let mut cdf = 0.0;
    let mut k = 0u32;
    while k < cap {
        // cdf = P(N < k); adding P(N = k) gives P(N < k + 1).
        cdf += ln_p.exp();
        k += 1;
        if cdf >= target {
            return k;
        }
        ln_p += ln_mean - f64::from(k).ln();
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn headroom_matches_the_poisson_quantile() {
        // Poisson(0.42): P(0) = 0.657, P(<=1) = 0.933, P(<=2) = 0.991.
        assert_eq!(headroom(0.42, 0.95, 100), 3);
        assert_eq!(headroom(0.42, 0.90, 100), 2);
        assert_eq!(headroom(0.42, 0.60, 100), 1);
        // Poisson(10): P(N <= 15) = 0.951, P(N <= 14) = 0.917.
        assert_eq!(headroom(10.0, 0.95, 100), 16);
        // A large mean neither underflows nor loops past the cap.
        let k = headroom(2000.0, 0.95, 100_000);
        assert!((2070..2080).contains(&k), "{k}");
        assert_eq!(headroom(2000.0, 0.95, 50), 50);
        assert_eq!(headroom(f64::NAN, 0.95, 7), 7);
    }

    #[test]
    fn the_recent_rate_follows_arrivals_and_decays() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        assert_eq!(l.recent_rate(t0), 0.0);
        // One request every 2 s for 30 minutes: the rate settles near 0.5/s.
        for i in 0..900 {
            l.arrival(t0 + Duration::from_secs(2 * i), None);
        }
        let end = t0 + Duration::from_secs(1800);
        let r = l.recent_rate(end);
        assert!((0.45..0.55).contains(&r), "{r}");
        // Quiet for one time constant: down by e.
        let later = l.recent_rate(end + RECENT_TAU);
        assert!((later - r / std::f64::consts::E).abs() < 1e-9, "{later}");
    }

    #[test]
    fn last_weeks_ramp_is_anticipated() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        // Monday 2026-11-30 00:00 UTC.
        let monday = 1_795_996_800u64;
        assert_eq!(slot(monday / 300), 0);
        // Week 1: 60 requests between 09:00 and 09:05, none otherwise.
        let nine = monday + 9 * 3600;
        for i in 0..60 {
            let s = nine + 5 * i;
            l.arrival(t0 + Duration::from_secs(s - monday), Some(wall(s)));
        }
        // A week later at 08:59:40, the recent rate has decayed to nothing, but the next 30 s
        // touch last week's 09:00 bucket: 60 requests in 300 s.
        let s = nine + 7 * 86_400 - 20;
        let now = t0 + Duration::from_secs(s - monday);
        l.advance(wall(s));
        assert!(l.recent_rate(now) < 1e-6);
        let r = l.expected_rate(now, Some(wall(s)), Duration::from_secs(30));
        assert!((r - 0.2).abs() < 1e-6, "{r}");
        // Ten minutes earlier nothing is expected yet.
        let r = l.expected_rate(now, Some(wall(s - 600)), Duration::from_secs(30));
        assert!(r < 1e-6, "{r}");
        // The bucket blends with this week's count: 0 requests now -> half of last week's.
        l.advance(wall(nine + 7 * 86_400 + 400));
        let r = l.week_rate(wall(nine + 7 * 86_400), Duration::ZERO);
        assert!((r - 0.1).abs() < 1e-6, "{r}");
    }

    #[test]
    fn the_refill_time_is_learned() {
        let mut l = Learner::default();
        assert_eq!(
            l.refill(Duration::from_secs(120)),
            DEFAULT_REFILL,
            "default before a measurement"
        );
        assert_eq!(l.refill(Duration::from_secs(10)), Duration::from_secs(10));
        l.refill_measured(20.0);
        assert_eq!(l.refill(Duration::from_secs(120)), Duration::from_secs(20));
        for _ in 0..50 {
            l.refill_measured(30.0);
        }
        let r = l.refill(Duration::from_secs(120)).as_secs_f64();
        assert!((29.9..=30.0).contains(&r), "{r}");
        l.refill_measured(f64::NAN);
        assert!((29.9..=30.0).contains(&l.refill(Duration::from_secs(120)).as_secs_f64()));
    }

    #[test]
    fn headroom_is_memoised_but_follows_the_rate() {
        let mut l = Learner::default();
        let r = Duration::from_secs(25);
        assert_eq!(l.headroom(0.0, r, 0.95, 100), 0, "no traffic: no headroom");
        let k = l.headroom(0.4, r, 0.95, 100);
        assert_eq!(k, headroom(10.0, 0.95, 100));
        assert_eq!(l.headroom(0.401, r, 0.95, 100), k);
        assert_eq!(l.headroom(0.8, r, 0.95, 100), headroom(20.0, 0.95, 100));
        assert_eq!(l.headroom(0.8, r, 0.95, 3), 3);
    }
}
