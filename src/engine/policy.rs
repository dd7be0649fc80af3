//! The sizing policy of one pool: how many idle agents it should keep now, and why.
//!
//! desired idle = max(floor, forecast headroom) + waiting demand, where
//! - the floor is the pool's `minIdle`, replaced while a schedule window is open by the highest
//!   `minIdle` of the open windows, and 0 once the pool has had no lease request for
//!   `scaleToZeroAfter` (an open window still applies then);
//! - the forecast headroom (with `warmHitTarget`) is [`super::headroom`] for the expected
//!   arrival rate and the learned refill time (0 while the pool sleeps);
//! - the cap is `maxTotal`, replaced while windows that set one are open by the highest of
//!   theirs. Provisioning never takes the pool above the cap, and idle agents above it are
//!   stopped.
//!
//! The source reported is the largest term: demand when it exceeds both others, else the
//! forecast when it exceeds the floor, else the floor's own (minIdle, schedule, scaleToZero).
//!
//! Windows are read against the wall clock the shell sets ([`Engine::set_wall_clock`]); until
//! it is set no window is open and the time-of-week model learns nothing. Evaluations are
//! cached until the next window start or end, so sizing costs O(1) per event.
//!
//! Also kept here, per pool: leases granted warm and cold (and the last hour's warm-hit
//! ratio, by minute) and idle agent-seconds (the cost side). Pure: time passed in.

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::forecast::Learner;
use super::*;
use crate::spec::Window;

/// Where a pool's desired idle count comes from (the largest term; see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdleSource {
    /// The pool's `minIdle`.
    #[default]
    MinIdle,
    /// An open schedule window's `minIdle`.
    Schedule,
    /// The forecast headroom for `warmHitTarget`.
    Forecast,
    /// Requests waiting (or, for a Jenkins pool, its queue).
    Demand,
    /// No request for `scaleToZeroAfter`: the pool sleeps.
    ScaleToZero,
}

impl IdleSource {
    /// The name used in status and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleSource::MinIdle => "minIdle",
            IdleSource::Schedule => "schedule",
            IdleSource::Forecast => "forecast",
            IdleSource::Demand => "demand",
            IdleSource::ScaleToZero => "scaleToZero",
        }
    }
}

/// What the policy decided for a pool on its last sizing pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Decision {
    /// Idle agents wanted beyond those serving demand, plus demand: what sizing provisions for
    /// (before the cap).
    pub want: u32,
    /// `want` capped by the cap (what status reports).
    pub desired_idle: u32,
    /// Why.
    pub source: IdleSource,
    /// The cap on the pool's agents in effect.
    pub cap: u32,
    /// The arrival rate the forecast used (per second).
    pub rate: f64,
    /// The refill time the forecast used.
    pub refill: Duration,
}

/// Cached window evaluation, valid for wall times in `[from, until)`.
#[derive(Debug, Clone, Copy)]
struct WindowCache {
    from: SystemTime,
    until: SystemTime,
    floor: Option<u32>,
    cap: Option<u32>,
}

/// Minutes of lease history the warm-hit ratio covers.
const HIT_MINUTES: usize = 60;

/// Per-pool policy state.
#[derive(Debug, Clone)]
pub(super) struct PoolPolicy {
    windows: Vec<Window>,
    cache: Option<WindowCache>,
    pub(super) learner: Learner,
    /// The last lease request attributed to the pool (or its creation).
    last_request: Instant,
    /// Origin of the minute counter.
    origin: Instant,
    /// Per minute (absolute minute since `origin`, warm, all) of the last hour.
    hits: [(u64, u32, u32); HIT_MINUTES],
    pub(super) warm_total: u64,
    pub(super) cold_total: u64,
    idle_seconds: f64,
    idle_at: Instant,
    idle_now: u32,
    /// The last decision, and when it was taken.
    pub(super) decision: Decision,
    pub(super) decided_at: Instant,
}

/// Compiles a spec's schedule windows (the spec was validated; a window that does not
/// compile is left out and logged).
fn compile(spec: &PoolSpec) -> Vec<Window> {
    spec.schedules
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.compile() {
            Ok(w) => Some(w),
            Err((field, msg)) => {
                tracing::warn!(index = i, field, error = %msg, "schedule window left out");
                None
            }
        })
        .collect()
}

impl PoolPolicy {
    pub(super) fn new(spec: &PoolSpec, now: Instant) -> PoolPolicy {
        PoolPolicy {
            windows: compile(spec),
            cache: None,
            learner: Learner::default(),
            last_request: now,
            origin: now,
            hits: [(u64::MAX, 0, 0); HIT_MINUTES],
            warm_total: 0,
            cold_total: 0,
            idle_seconds: 0.0,
            idle_at: now,
            idle_now: 0,
            decision: Decision {
                cap: spec.max_total,
                desired_idle: spec.min_idle,
                want: spec.min_idle,
                ..Decision::default()
            },
            decided_at: now,
        }
    }

    /// The spec changed: windows are compiled again; what was learned stays.
    pub(super) fn respec(&mut self, spec: &PoolSpec) {
        self.windows = compile(spec);
        self.cache = None;
    }

    /// The open windows' floor and cap at `wall` (none without a wall clock).
    fn windows_at(&mut self, wall: Option<SystemTime>) -> (Option<u32>, Option<u32>) {
        let Some(t) = wall else { return (None, None) };
        if self.windows.is_empty() {
            return (None, None);
        }
        if let Some(c) = self.cache
            && c.from <= t
            && t < c.until
        {
            return (c.floor, c.cap);
        }
        let mut floor: Option<u32> = None;
        let mut cap: Option<u32> = None;
        // Looked at again within an hour at the latest (a window whose next start is not
        // found stays closed until then).
        let mut until = t + Duration::from_secs(3600);
        for w in &self.windows {
            match w.open_until(t) {
                Some(end) => {
                    floor = Some(floor.map_or(w.min_idle, |f| f.max(w.min_idle)));
                    if let Some(m) = w.max_total {
                        cap = Some(cap.map_or(m, |c| c.max(m)));
                    }
                    until = until.min(end);
                }
                None => {
                    if let Some(n) = w.next_start(t) {
                        until = until.min(n);
                    }
                }
            }
        }
        self.cache = Some(WindowCache {
            from: t,
            until,
            floor,
            cap,
        });
        (floor, cap)
    }

    /// True when the pool sleeps at `now` (no request for `scaleToZeroAfter`).
    pub(super) fn asleep(&self, spec: &PoolSpec, now: Instant) -> bool {
        spec.scale_to_zero_after
            .is_some_and(|d| now.saturating_duration_since(self.last_request) >= d.0)
    }

    /// Decides the pool's desired idle count at `now` (wall time `wall`) with `demand`
    /// requests waiting for it. O(1) amortised (see the module docs).
    pub(super) fn decide(
        &mut self,
        spec: &PoolSpec,
        now: Instant,
        wall: Option<SystemTime>,
        demand: u32,
    ) -> Decision {
        let (window_floor, window_cap) = self.windows_at(wall);
        let cap = window_cap.unwrap_or(spec.max_total);
        if let Some(w) = wall {
            self.learner.advance(w);
        }
        let refill = self.learner.refill(spec.connect_timeout.0);
        let rate = self.learner.expected_rate(now, wall, refill);
        let asleep = self.asleep(spec, now);
        let (floor, floor_source) = match window_floor {
            Some(f) => (f, IdleSource::Schedule),
            None if asleep => (0, IdleSource::ScaleToZero),
            None => (spec.min_idle, IdleSource::MinIdle),
        };
        let headroom = match spec.warm_hit_target {
            Some(target) if !asleep => self.learner.headroom(rate, refill, target, cap),
            _ => 0,
        };
        let base = floor.max(headroom);
        let source = if demand > base {
            IdleSource::Demand
        } else if headroom > floor {
            IdleSource::Forecast
        } else {
            floor_source
        };
        let want = base.saturating_add(demand);
        let d = Decision {
            want,
            desired_idle: want.min(cap),
            source,
            cap,
            rate,
            refill,
        };
        self.decision = d;
        self.decided_at = now;
        d
    }

    /// A lease request attributed to the pool.
    pub(super) fn arrival(&mut self, now: Instant, wall: Option<SystemTime>) {
        self.last_request = self.last_request.max(now);
        self.learner.arrival(now, wall);
    }

    /// Demand seen from outside (a Jenkins queue): the pool is not idle.
    pub(super) fn touched(&mut self, now: Instant) {
        self.last_request = self.last_request.max(now);
    }

    fn minute(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / 60
    }

    /// A lease was granted: `warm` when an idle agent was ready at request time.
    pub(super) fn granted(&mut self, now: Instant, warm: bool) {
        if warm {
            self.warm_total += 1;
        } else {
            self.cold_total += 1;
        }
        let m = self.minute(now);
        let slot = &mut self.hits[(m % HIT_MINUTES as u64) as usize];
        if slot.0 != m {
            *slot = (m, 0, 0);
        }
        slot.1 += u32::from(warm);
        slot.2 += 1;
    }

    /// Share of the leases of the last hour (up to `now`) that were warm; `None` without any.
    pub(super) fn warm_hit_ratio(&self, now: Instant) -> Option<f64> {
        let m = self.minute(now);
        let (warm, all) = self
            .hits
            .iter()
            .filter(|(at, _, _)| *at <= m && m - *at < HIT_MINUTES as u64)
            .fold((0u64, 0u64), |(w, a), s| {
                (w + u64::from(s.1), a + u64::from(s.2))
            });
        (all > 0).then(|| warm as f64 / all as f64)
    }

    /// The pool's idle agents change at `now` (to `idle`): the idle agent-seconds so far are
    /// added up first.
    pub(super) fn idle_changed(&mut self, now: Instant, idle: u32) {
        if now > self.idle_at {
            self.idle_seconds +=
                f64::from(self.idle_now) * now.duration_since(self.idle_at).as_secs_f64();
            self.idle_at = now;
        }
        self.idle_now = idle;
    }

    /// Idle agent-seconds up to `now`.
    pub(super) fn idle_seconds(&self, now: Instant) -> f64 {
        self.idle_seconds
            + f64::from(self.idle_now) * now.saturating_duration_since(self.idle_at).as_secs_f64()
    }
}

impl Engine {
    /// Tells the engine the wall-clock time `wall` at the instant `at`: the wall time at any
    /// `now` is `wall + (now - at)`. The engine never reads the clock; the service calls this
    /// at start and on every tick (so it follows clock changes), the simulator once with its
    /// virtual start. Until it is called, no schedule window is open and the time-of-week
    /// model learns nothing (the recent rate and refill time still are).
    pub fn set_wall_clock(&mut self, at: Instant, wall: SystemTime) {
        self.wall = Some((at, wall));
    }

    /// The wall-clock time at `now`, once [`Engine::set_wall_clock`] was called.
    pub fn wall_at(&self, now: Instant) -> Option<SystemTime> {
        let (at, wall) = self.wall?;
        Some(match now.checked_duration_since(at) {
            Some(d) => wall + d,
            None => wall - at.duration_since(now),
        })
    }

    /// Idle agent-seconds of a pool up to `now` (the cost side of its warm hits).
    pub fn idle_agent_seconds(&self, pool: &str, now: Instant) -> f64 {
        self.pools
            .get(pool)
            .map_or(0.0, |p| p.policy.idle_seconds(now))
    }

    /// Records a lease request attributed to `pool` (its learner and its quiet timer).
    pub(super) fn record_arrival(&mut self, pool: &str, now: Instant) {
        let wall = self.wall_at(now);
        if let Some(p) = self.pools.get_mut(pool) {
            p.policy.arrival(now, wall);
        }
    }

    /// The pool a waiting request counts for: the first matching pool (by name) with room
    /// below its cap, else the first matching pool.
    pub(super) fn attribute(&mut self, req: &LeaseRequest) -> Option<String> {
        let names = self.matching_pools(req);
        let room = |n: &String| {
            self.pools
                .get(n)
                .is_some_and(|p| (p.members.len() as u32) < p.policy.decision.cap)
        };
        names
            .iter()
            .find(|n| room(n))
            .or_else(|| names.first())
            .cloned()
    }
}
