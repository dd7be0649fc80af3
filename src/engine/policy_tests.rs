//! Sizing policy scenarios: schedule windows (floors, caps, overlaps, no wall clock), forecast
//! headroom, scale-to-zero, warm and cold leases, idle agent-seconds.

use std::time::{Duration, Instant, SystemTime};

use super::tests::{ms, req};
use super::*;
use crate::spec::{Dur, PoolSpec, Schedule};

/// An engine whose agents never miss a heartbeat over the hours these tests span.
fn engine() -> Engine {
    let cfg = EngineConfig {
        heartbeat_timeout: Duration::from_secs(365 * 86_400),
        ..EngineConfig::default()
    };
    Engine::new(cfg, "t", Box::new(Unpaced))
}

/// A pool spec whose agents live long enough for these tests (no rotation by maxAge).
fn spec(labels: &[&str], min_idle: u32, max_total: u32, max_uses: u32) -> PoolSpec {
    let mut s = super::tests::spec(labels, min_idle, max_total, max_uses);
    s.max_age = Dur::secs(365 * 86_400);
    s.provisioning.max_concurrent = 1000;
    s
}

fn at(rfc3339: &str) -> SystemTime {
    SystemTime::from(rfc3339.parse::<jiff::Timestamp>().unwrap())
}

fn window(cron: &str, dur: &str, min_idle: u32, max_total: Option<u32>) -> Schedule {
    Schedule {
        cron: cron.into(),
        duration: Dur::parse(dur).unwrap(),
        time_zone: "Europe/Berlin".into(),
        min_idle,
        max_total,
    }
}

fn status(e: &Engine) -> PoolStatus {
    e.pool_status().into_iter().next().unwrap()
}

/// Plays the backend: every provisioned agent starts and registers at `now`, every
/// terminated one is gone.
fn settle(e: &mut Engine, now: Instant) {
    for _ in 0..50 {
        let acts = e.take_actions();
        if acts.is_empty() {
            return;
        }
        for a in acts {
            match a {
                Action::Provision { agent, pool } => {
                    e.agent_started(&agent, now);
                    e.agent_connected(&agent, Some(&pool), Health::default(), now)
                        .unwrap();
                }
                Action::Terminate { agent, .. } => e.agent_exited(&agent, "gone", now),
                _ => {}
            }
        }
    }
}

#[test]
fn office_hours_window_raises_the_floor_and_its_cap_applies() {
    let t0 = Instant::now();
    let mut e = engine();
    // Monday 2026-11-30 07:59 in Berlin (06:59 UTC).
    e.set_wall_clock(t0, at("2026-11-30T06:59:00Z"));
    let mut s = spec(&["linux"], 1, 20, 1);
    s.idle_ttl = Dur::secs(60);
    s.schedules = vec![window("0 8 * * 1-5", "10h", 5, Some(8))];
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    let st = status(&e);
    assert_eq!((st.idle, st.desired_idle), (1, 1));
    assert_eq!(st.desired_idle_source, IdleSource::MinIdle);
    // 08:00: the window opens; the next tick provisions up to its minIdle.
    let t1 = t0 + Duration::from_secs(60);
    e.tick(t1);
    settle(&mut e, t1);
    let st = status(&e);
    assert_eq!((st.idle, st.desired_idle), (5, 5));
    assert_eq!(st.desired_idle_source, IdleSource::Schedule);
    // Waiting demand above the window's cap (8) provisions only up to it.
    for _ in 0..12 {
        let _ = e.request_lease(req("linux", 60_000, 600_000), t1);
    }
    settle(&mut e, t1);
    let st = status(&e);
    assert_eq!(st.total, 8, "{st:?}");
    // 5 (the window's floor) + 4 waiting, capped by its maxTotal; the floor dominates.
    assert_eq!(st.waiting, 4);
    assert_eq!(st.desired_idle, 8, "capped by the window's maxTotal");
    assert_eq!(st.desired_idle_source, IdleSource::Schedule);
    // 18:00: the window closes; the pool's minIdle applies again and extra idle agents go
    // after idleTtl.
    let t2 = t0 + Duration::from_secs(60 + 10 * 3600);
    e.tick(t2);
    let st = status(&e);
    assert_eq!((st.waiting, st.desired_idle), (0, 1), "{st:?}");
    assert_eq!(st.desired_idle_source, IdleSource::MinIdle);
    e.check_invariants().unwrap();
}

#[test]
fn overlapping_windows_take_the_highest_floor_and_cap() {
    let t0 = Instant::now();
    let mut e = engine();
    e.set_wall_clock(t0, at("2026-11-30T09:00:00Z")); // Monday 10:00 in Berlin
    let mut s = spec(&["linux"], 0, 4, 1);
    s.schedules = vec![
        window("0 8 * * *", "10h", 3, Some(6)),
        window("0 9 * * 1", "3h", 5, None),
        window("0 7 * * *", "12h", 1, Some(10)),
        // Closed now (Sundays).
        window("0 0 * * 0", "24h", 9, Some(12)),
    ];
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    let st = status(&e);
    assert_eq!(st.desired_idle, 5, "highest minIdle of the open windows");
    assert_eq!(st.idle, 5);
    assert_eq!(st.desired_idle_source, IdleSource::Schedule);
    assert_eq!(e.pools["p"].policy.decision.cap, 10, "highest maxTotal set");
}

#[test]
fn without_a_wall_clock_no_window_opens() {
    let t0 = Instant::now();
    let mut e = engine();
    let mut s = spec(&["linux"], 1, 10, 1);
    s.schedules = vec![window("* * * * *", "100y", 6, None)];
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    assert_eq!(status(&e).idle, 1);
    e.set_wall_clock(t0, at("2026-11-30T09:00:00Z"));
    e.tick(t0 + ms(1));
    settle(&mut e, t0 + ms(1));
    assert_eq!(status(&e).idle, 6);
}

#[test]
fn a_window_cap_below_the_pool_stops_idle_agents_above_it() {
    let t0 = Instant::now();
    let mut e = engine();
    e.set_wall_clock(t0, at("2026-11-30T16:59:00Z")); // Monday 17:59 in Berlin
    let mut s = spec(&["linux"], 6, 10, 1);
    s.schedules = vec![window("0 18 * * *", "12h", 1, Some(2))];
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    assert_eq!(status(&e).idle, 6);
    let t1 = t0 + Duration::from_secs(61);
    e.tick(t1);
    let acts = e.take_actions();
    let over: Vec<_> = acts
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Terminate {
                    reason: Reason::OverCap,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(over.len(), 4, "{acts:?}");
}

#[test]
fn forecast_headroom_follows_the_learned_rate_and_refill() {
    let t0 = Instant::now();
    let mut e = engine();
    let mut s = spec(&["linux"], 0, 100, 1);
    s.warm_hit_target = Some(0.95);
    s.connect_timeout = Dur::secs(120);
    e.upsert_pool("p", s, t0);
    // Nothing learned: no traffic, no headroom.
    assert_eq!(status(&e).desired_idle, 0);
    // One request every 2 s for 20 minutes; agents take 25 s to come.
    let mut now = t0;
    let mut pending: Vec<(Instant, String)> = Vec::new();
    let mut leases = Vec::new();
    for i in 0..600u64 {
        now = t0 + Duration::from_secs(2 * i);
        // Agents provisioned 25 s ago register.
        while let Some(pos) = pending.iter().position(|(t, _)| *t <= now) {
            let (_, id) = pending.remove(pos);
            e.agent_started(&id, now);
            e.agent_connected(&id, Some("p"), Health::default(), now)
                .unwrap();
        }
        if let Ok(LeaseDecision::Granted(l)) = e.request_lease(req("linux", 60_000, 600_000), now) {
            leases.push(l.id);
        }
        e.tick(now);
        for a in e.take_actions() {
            match a {
                Action::Provision { agent, .. } => {
                    pending.push((now + Duration::from_secs(25), agent))
                }
                Action::Granted { lease, .. } => leases.push(lease.id),
                Action::Terminate { agent, .. } => e.agent_exited(&agent, "gone", now),
                _ => {}
            }
        }
        for l in leases.drain(..) {
            let _ = e.release(&l, now);
        }
    }
    let st = status(&e);
    // Provisioned on a 2 s step, registered on the first step 25 s later: 26 s.
    assert!((25.0..=26.01).contains(&st.refill_seconds), "{st:?}");
    assert!((25.0..35.0).contains(&st.arrival_rate), "{st:?}");
    // 0.5/s x 25 s = 12.5 expected during a refill.
    let k = headroom(st.arrival_rate / 60.0 * st.refill_seconds, 0.95, 100);
    assert!((17..=21).contains(&k), "{k}");
    assert!(st.desired_idle >= k, "{st:?}");
    assert!(
        matches!(
            st.desired_idle_source,
            IdleSource::Forecast | IdleSource::Demand
        ),
        "{st:?}"
    );
    // Most leases of the run found an idle agent (the first minutes learn the rate).
    let ratio = st.warm_hit_ratio.unwrap();
    assert!(ratio > 0.7, "{st:?}");
    let leased = st.warm_leases_total + st.cold_leases_total;
    assert!((590..=600).contains(&leased), "{st:?}");
    assert!(st.idle_agent_seconds > 0.0);
    e.check_invariants().unwrap();
}

#[test]
fn scale_to_zero_after_the_quiet_time_and_the_next_request_wakes_it() {
    let t0 = Instant::now();
    let mut e = engine();
    let mut s = spec(&["linux"], 2, 10, 1);
    s.idle_ttl = Dur::secs(60);
    s.scale_to_zero_after = Some(Dur::secs(3600));
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    assert_eq!(status(&e).idle, 2);
    // Just before the quiet time: still minIdle.
    let t1 = t0 + Duration::from_secs(3599);
    e.tick(t1);
    settle(&mut e, t1);
    let st = status(&e);
    assert_eq!((st.idle, st.desired_idle_source), (2, IdleSource::MinIdle));
    // After it: desired 0, idle agents past idleTtl stop.
    let t2 = t0 + Duration::from_secs(3600);
    e.tick(t2);
    settle(&mut e, t2);
    let st = status(&e);
    assert_eq!(
        (st.idle, st.desired_idle, st.desired_idle_source),
        (0, 0, IdleSource::ScaleToZero)
    );
    // A request wakes it: cold, and minIdle applies again.
    let t3 = t2 + Duration::from_secs(10);
    let d = e.request_lease(req("linux", 60_000, 600_000), t3).unwrap();
    assert!(matches!(d, LeaseDecision::Queued(_)));
    settle(&mut e, t3);
    e.tick(t3);
    settle(&mut e, t3);
    let st = status(&e);
    assert_eq!((st.leased, st.idle), (1, 2), "{st:?}");
    assert_eq!((st.warm_leases_total, st.cold_leases_total), (0, 1));
    assert_eq!(st.warm_hit_ratio, Some(0.0));
}

#[test]
fn an_open_window_keeps_a_sleeping_pool_warm() {
    let t0 = Instant::now();
    let mut e = engine();
    e.set_wall_clock(t0, at("2026-11-30T09:00:00Z"));
    let mut s = spec(&["linux"], 2, 10, 1);
    s.idle_ttl = Dur::secs(1);
    s.scale_to_zero_after = Some(Dur::secs(60));
    s.schedules = vec![window("0 8 * * *", "10h", 1, None)];
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    let t1 = t0 + Duration::from_secs(120);
    e.tick(t1);
    settle(&mut e, t1);
    let st = status(&e);
    assert_eq!(
        (st.idle, st.desired_idle, st.desired_idle_source),
        (1, 1, IdleSource::Schedule)
    );
}

#[test]
fn warm_and_cold_leases_and_idle_seconds_are_counted() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 10, 1), t0);
    settle(&mut e, t0);
    // 1 idle agent for 10 s.
    let t1 = t0 + Duration::from_secs(10);
    let d = e.request_lease(req("linux", 60_000, 600_000), t1).unwrap();
    assert!(matches!(d, LeaseDecision::Granted(_)));
    let acts = e.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Observe(Observation::Leased { warm: true, .. }))),
        "{acts:?}"
    );
    // The replacement is not there yet: the next request waits (cold).
    let d = e.request_lease(req("linux", 60_000, 600_000), t1).unwrap();
    assert!(matches!(d, LeaseDecision::Queued(_)));
    let t2 = t1 + Duration::from_secs(5);
    for a in acts {
        if let Action::Provision { agent, pool } = a {
            e.agent_started(&agent, t2);
            e.agent_connected(&agent, Some(&pool), Health::default(), t2)
                .unwrap();
        }
    }
    settle(&mut e, t2);
    let st = status(&e);
    assert_eq!((st.warm_leases_total, st.cold_leases_total), (1, 1));
    assert_eq!(st.warm_hit_ratio, Some(0.5));
    assert!((st.idle_agent_seconds - 10.0).abs() < 1e-6, "{st:?}");
    assert_eq!(
        e.idle_agent_seconds("p", t2 + Duration::from_secs(4)),
        st.idle_agent_seconds + 4.0
    );
}
