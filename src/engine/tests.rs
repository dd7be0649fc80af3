//! Engine tests: a scenario for each rule (recycling, waiting, throttling, backoff, adoption).
//! The invariants are checked on random event sequences in proptests.rs.

use std::time::{Duration, Instant};

use super::*;
use crate::labels::Expr;
use crate::spec::{Dur, PoolSpec};

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn spec(labels: &[&str], min_idle: u32, max_total: u32, max_uses: u32) -> PoolSpec {
    PoolSpec {
        labels: labels.iter().map(|s| s.to_string()).collect(),
        min_idle,
        max_total,
        max_uses,
        idle_ttl: Dur(ms(1000)),
        max_age: Dur(ms(10_000)),
        connect_timeout: Dur(ms(500)),
        ..PoolSpec::default()
    }
}

pub(super) fn req(sel: &str, wait: u64, ttl: u64) -> LeaseRequest {
    LeaseRequest {
        selector: Expr::parse(sel).unwrap(),
        selector_text: sel.into(),
        wait: ms(wait),
        ttl: ms(ttl),
        holder: "test".into(),
        idempotency_key: None,
    }
}

pub(super) fn engine() -> Engine {
    Engine::new(EngineConfig::default(), "t", Box::new(Unpaced))
}

/// Plays the backend and the agents: starts and connects every agent the engine provisions,
/// confirms terminations, acknowledges releases.
fn settle(e: &mut Engine, now: Instant) -> Vec<Action> {
    let mut all = Vec::new();
    for _ in 0..20 {
        let acts = e.take_actions();
        if acts.is_empty() {
            break;
        }
        for a in &acts {
            match a {
                Action::Provision { agent, pool } => {
                    e.agent_started(agent, now);
                    e.agent_connected(agent, Some(pool), Health::default(), now)
                        .unwrap();
                }
                Action::Terminate { agent, .. } => e.agent_exited(agent, "killed", now),
                Action::Release { agent, .. } => e.agent_ready(agent, Health::default(), now),
                _ => {}
            }
        }
        all.extend(acts);
    }
    all
}

fn status(e: &Engine, pool: &str) -> PoolStatus {
    e.pool_status()
        .into_iter()
        .find(|p| p.name == pool)
        .unwrap()
}

fn terminations(acts: &[Action]) -> Vec<&'static str> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Terminate { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn fills_min_idle_and_grants_instantly() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 2, 5, 0), t0);
    settle(&mut e, t0);
    assert_eq!(status(&e, "p").idle, 2);
    let d = e.request_lease(req("linux", 1000, 5000), t0).unwrap();
    let LeaseDecision::Granted(l) = d else {
        panic!("{d:?}")
    };
    assert_eq!(l.pool, "p");
    settle(&mut e, t0);
    // One leased, and a replacement keeps two idle.
    let s = status(&e, "p");
    assert_eq!((s.idle, s.leased, s.total), (2, 1, 3));
}

#[test]
fn unsatisfiable_fails_at_once_with_pools_named() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 0, 5, 0), t0);
    let err = e.request_lease(req("windows", 1000, 1000), t0).unwrap_err();
    assert_eq!(err.code(), "unsatisfiable");
    assert!(err.to_string().contains("p: [linux]"), "{err}");
    assert_eq!(e.waiting(), 0);
}

#[test]
fn waits_for_cold_agent_and_expires_on_deadline() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 0, 1, 0), t0);
    let LeaseDecision::Queued(r1) = e.request_lease(req("linux", 100, 5000), t0).unwrap() else {
        panic!()
    };
    // Demand provisioned one agent.
    let acts = e.take_actions();
    let Action::Provision { agent, .. } = acts[0].clone() else {
        panic!("{acts:?}")
    };
    let agent = &agent;
    let LeaseDecision::Queued(r2) = e.request_lease(req("linux", 100, 5000), t0).unwrap() else {
        panic!()
    };
    e.agent_started(agent, t0 + ms(10));
    e.agent_connected(agent, Some("p"), Health::default(), t0 + ms(20))
        .unwrap();
    let acts = e.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Granted { request, .. } if *request == r1))
    );
    e.tick(t0 + ms(100));
    let acts = e.take_actions();
    assert!(acts.iter().any(|a| matches!(a,
        Action::WaitFailed { request, error: LeaseError::WaitExpired { .. } } if *request == r2)));
}

#[test]
fn release_recycles_per_max_uses() {
    let t0 = Instant::now();
    for (max_uses, leases_on_first) in [(1u32, 1u32), (3, 3)] {
        let mut e = engine();
        e.upsert_pool("p", spec(&["linux"], 1, 1, max_uses), t0);
        settle(&mut e, t0);
        let first = e.agents().next().unwrap().id.clone();
        let mut served = 0;
        for _ in 0..4 {
            let LeaseDecision::Granted(l) = e.request_lease(req("linux", 0, 5000), t0).unwrap()
            else {
                panic!()
            };
            if l.agent == first {
                served += 1;
            }
            e.release(&l.id, t0).unwrap();
            settle(&mut e, t0);
        }
        assert_eq!(served, leases_on_first, "maxUses {max_uses}");
    }
}

#[test]
fn idle_ttl_scales_down_to_min_idle() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 5, 0), t0);
    settle(&mut e, t0);
    // Burst demand creates extra agents.
    let l1 = match e.request_lease(req("linux", 1000, 60_000), t0).unwrap() {
        LeaseDecision::Granted(l) => l,
        d => panic!("{d:?}"),
    };
    let l2 = match e.request_lease(req("linux", 1000, 60_000), t0).unwrap() {
        LeaseDecision::Queued(_) => {
            settle(&mut e, t0);
            None
        }
        LeaseDecision::Granted(l) => Some(l),
        d => panic!("{d:?}"),
    };
    settle(&mut e, t0);
    e.release(&l1.id, t0).unwrap();
    if let Some(l) = l2 {
        e.release(&l.id, t0).unwrap();
    }
    settle(&mut e, t0);
    assert!(status(&e, "p").idle >= 2);
    e.tick(t0 + ms(999));
    assert!(terminations(&settle(&mut e, t0 + ms(999))).is_empty());
    e.tick(t0 + ms(1000));
    let acts = settle(&mut e, t0 + ms(1000));
    assert!(terminations(&acts).iter().all(|r| *r == "idle-ttl"));
    assert_eq!(status(&e, "p").idle, 1);
}

#[test]
fn max_age_replaces_before_terminating() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 2, 4, 0), t0);
    settle(&mut e, t0);
    let t1 = t0 + ms(10_000);
    e.tick(t1);
    // First pass: replacements requested, old agents still idle.
    let acts = e.take_actions();
    let provisions: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Provision { agent, .. } => Some(agent.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(provisions.len(), 2);
    assert!(terminations(&acts).is_empty(), "{acts:?}");
    assert_eq!(status(&e, "p").idle, 2);
    for a in &provisions {
        e.agent_started(a, t1);
        e.agent_connected(a, Some("p"), Health::default(), t1)
            .unwrap();
    }
    let acts = settle(&mut e, t1);
    assert_eq!(terminations(&acts), vec!["max-age", "max-age"]);
    assert_eq!(status(&e, "p").idle, 2);
}

#[test]
fn connect_timeout_is_a_leak() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 2, 0), t0);
    let acts = e.take_actions();
    let Action::Provision { agent, .. } = acts[0].clone() else {
        panic!()
    };
    e.agent_started(&agent, t0);
    e.tick(t0 + ms(500));
    let acts = e.take_actions();
    assert_eq!(terminations(&acts), vec!["connect-timeout"]);
    assert_eq!(status(&e, "p").leaks_total, 1);
}

#[test]
fn unhealthy_heartbeat_recycles_idle_now_and_leased_on_release() {
    let t0 = Instant::now();
    let mut e = engine();
    let mut s = spec(&["linux"], 2, 4, 0);
    s.health.max_leftover_processes = 0;
    s.health.max_workspace_bytes = 100;
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    let LeaseDecision::Granted(l) = e.request_lease(req("linux", 0, 5000), t0).unwrap() else {
        panic!()
    };
    settle(&mut e, t0);
    let idle = e
        .agents()
        .find(|a| a.state == AgentState::Idle)
        .unwrap()
        .id
        .clone();
    let sick = Health {
        workspace_bytes: 101,
        leftover_processes: 2,
    };
    e.agent_heartbeat(&idle, sick, t0);
    let acts = e.take_actions();
    assert_eq!(terminations(&acts), vec!["unhealthy"]);
    e.agent_heartbeat(&l.agent, sick, t0);
    assert!(
        terminations(&e.take_actions()).is_empty(),
        "leased agent keeps its lease"
    );
    e.release(&l.id, t0).unwrap();
    assert_eq!(terminations(&e.take_actions()), vec!["unhealthy"]);
}

#[test]
fn unrenewed_lease_expires_and_agent_is_recycled() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 2, 0), t0);
    settle(&mut e, t0);
    let LeaseDecision::Granted(l) = e.request_lease(req("linux", 0, 300), t0).unwrap() else {
        panic!()
    };
    e.tick(t0 + ms(200));
    e.renew(&l.id, None, t0 + ms(200)).unwrap();
    e.tick(t0 + ms(400));
    assert_eq!(e.lease(&l.id).unwrap().state, LeaseState::Active);
    e.tick(t0 + ms(500));
    let acts = e.take_actions();
    assert!(terminations(&acts).contains(&"lease-expired"));
    let l = e.lease(&l.id).unwrap().clone();
    assert_eq!(l.state, LeaseState::Expired);
    assert!(l.end_reason.as_deref().unwrap().contains(&l.agent));
    assert_eq!(e.renew(&l.id, None, t0).unwrap_err().code(), "lease_ended");
}

#[test]
fn connect_checks() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 2, 0), t0);
    let acts = e.take_actions();
    let Action::Provision { agent, .. } = acts[0].clone() else {
        panic!()
    };
    let agent = &agent;
    assert_eq!(
        e.check_connect("nope", None),
        Err(ConnectError::UnknownAgent("nope".into()))
    );
    assert!(matches!(
        e.check_connect(agent, Some("q")),
        Err(ConnectError::WrongPool { .. })
    ));
    e.agent_connected(agent, Some("p"), Health::default(), t0)
        .unwrap();
    assert_eq!(
        e.agent_connected(agent, Some("p"), Health::default(), t0),
        Err(ConnectError::AlreadyConnected(agent.clone()))
    );
}

#[test]
fn throttled_provisioning_is_reported() {
    struct Budget(u32);
    impl Pacer for Budget {
        fn configure(&mut self, _: &str, _: &PoolSpec) {}
        fn try_acquire(&mut self, _: &str) -> bool {
            if self.0 == 0 {
                return false;
            }
            self.0 -= 1;
            true
        }
    }
    let t0 = Instant::now();
    let mut e = Engine::new(EngineConfig::default(), "t", Box::new(Budget(2)));
    e.upsert_pool("p", spec(&["linux"], 5, 5, 0), t0);
    let acts = e.take_actions();
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::Provision { .. }))
            .count(),
        2
    );
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Observe(Observation::Throttled { .. })))
    );
    let s = status(&e, "p");
    assert!(s.throttled);
    assert_eq!(s.throttled_total, 1);
}

#[test]
fn idempotency_key_returns_the_same_lease() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 2, 4, 0), t0);
    settle(&mut e, t0);
    let mut r = req("linux", 0, 5000);
    r.idempotency_key = Some("job-42".into());
    let LeaseDecision::Granted(a) = e.request_lease(r.clone(), t0).unwrap() else {
        panic!()
    };
    let LeaseDecision::Existing(b) = e.request_lease(r.clone(), t0).unwrap() else {
        panic!()
    };
    assert_eq!(a.id, b.id);
    e.release(&a.id, t0).unwrap();
    settle(&mut e, t0);
    let LeaseDecision::Granted(c) = e.request_lease(r, t0).unwrap() else {
        panic!()
    };
    assert_ne!(c.id, a.id);
}

#[test]
fn shutdown_fails_waiters_and_refuses_requests() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 0, 1, 0), t0);
    let LeaseDecision::Queued(r) = e.request_lease(req("linux", 5000, 5000), t0).unwrap() else {
        panic!()
    };
    e.begin_shutdown(t0);
    assert!(e.take_actions().iter().any(|a| matches!(a,
        Action::WaitFailed { request, error: LeaseError::ShuttingDown } if *request == r)));
    assert_eq!(
        e.request_lease(req("linux", 0, 1), t0).unwrap_err(),
        LeaseError::ShuttingDown
    );
}

#[test]
fn failed_provisions_do_not_hold_capacity() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 2, 0), t0);
    let mut now = t0;
    for _ in 0..5 {
        let acts = e.take_actions();
        let Some(Action::Provision { agent, .. }) = acts
            .iter()
            .find(|a| matches!(a, Action::Provision { .. }))
            .cloned()
        else {
            panic!("a provision each time: {acts:?}")
        };
        e.provision_failed(&agent, "no such program", now);
        let s = status(&e, "p");
        assert!(s.total <= 1, "failed agents still count: {s:?}");
        assert!(s.last_error.as_deref().unwrap().contains("no such program"));
        // Past the backoff of this failure.
        now += BACKOFF_MAX;
        e.tick(now);
    }
    assert_eq!(status(&e, "p").provision_failures_total, 5);
}

#[test]
fn queue_limit_does_not_block_a_request_an_idle_agent_can_serve() {
    let t0 = Instant::now();
    let mut e = Engine::new(
        EngineConfig {
            max_waiters: 1,
            ..EngineConfig::default()
        },
        "t",
        Box::new(Unpaced),
    );
    e.upsert_pool("busy", spec(&["busy"], 1, 1, 0), t0);
    e.upsert_pool("free", spec(&["free"], 1, 1, 0), t0);
    settle(&mut e, t0);
    let LeaseDecision::Granted(_) = e.request_lease(req("busy", 5000, 5000), t0).unwrap() else {
        panic!()
    };
    let LeaseDecision::Queued(_) = e.request_lease(req("busy", 5000, 5000), t0).unwrap() else {
        panic!()
    };
    assert_eq!(
        e.request_lease(req("busy", 5000, 5000), t0)
            .unwrap_err()
            .code(),
        "queue_full"
    );
    assert!(matches!(
        e.request_lease(req("free", 5000, 5000), t0).unwrap(),
        LeaseDecision::Granted(_)
    ));
}

#[test]
fn connect_timeout_counts_from_start_and_stuck_provisioning_is_not_a_leak() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 1, 0), t0);
    let acts = e.take_actions();
    let Action::Provision { agent, .. } = acts[0].clone() else {
        panic!()
    };
    // Never started by the backend: provision-timeout, not a leak but a failed provision.
    e.tick(t0 + ms(500));
    assert_eq!(terminations(&e.take_actions()), vec!["provision-timeout"]);
    assert_eq!(status(&e, "p").leaks_total, 0);
    assert_eq!(status(&e, "p").provision_failures_total, 1);
    e.agent_exited(&agent, "never started", t0 + ms(500));
    // Started late: the connect deadline runs from the start. (The next provision waits out
    // the backoff.)
    let t1 = t0 + ms(500) + BACKOFF_BASE;
    e.tick(t1);
    let acts = e.take_actions();
    let Action::Provision { agent, .. } = acts[0].clone() else {
        panic!("{acts:?}")
    };
    e.agent_started(&agent, t1 + ms(400));
    e.tick(t1 + ms(800));
    assert!(terminations(&e.take_actions()).is_empty());
    e.tick(t1 + ms(900));
    assert_eq!(terminations(&e.take_actions()), vec!["connect-timeout"]);
    assert_eq!(status(&e, "p").leaks_total, 1);
}

#[test]
fn retired_agents_roll_replacement_first() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 2, 4, 0), t0);
    settle(&mut e, t0);
    let old: Vec<AgentId> = e.agents().map(|a| a.id.clone()).collect();
    for id in &old {
        e.retire(id, t0);
    }
    let acts = e.take_actions();
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::Provision { .. }))
            .count(),
        2,
        "replacements first"
    );
    assert!(terminations(&acts).is_empty(), "{acts:?}");
    for a in acts {
        if let Action::Provision { agent, .. } = a {
            e.agent_started(&agent, t0);
            e.agent_connected(&agent, Some("p"), Health::default(), t0)
                .unwrap();
        }
    }
    let acts = settle(&mut e, t0);
    assert_eq!(terminations(&acts), vec!["rolled", "rolled"]);
    assert!(e.agents().all(|a| !old.contains(&a.id)));
}

#[test]
fn provisioning_failures_back_off_exponentially_with_jitter() {
    assert!(backoff("p", 1) >= BACKOFF_BASE / 2 && backoff("p", 1) <= BACKOFF_BASE);
    assert!(backoff("p", 3) >= BACKOFF_BASE * 2 && backoff("p", 3) <= BACKOFF_BASE * 4);
    assert!(backoff("p", 40) <= BACKOFF_MAX);
    assert_ne!(
        backoff("a", 5),
        backoff("b", 5),
        "pools failing together spread out"
    );

    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 2, 0), t0);
    let mut now = t0;
    let mut attempts = Vec::new();
    for _ in 0..600 {
        for a in e.take_actions() {
            if let Action::Provision { agent, .. } = a {
                attempts.push(now);
                e.provision_failed(&agent, "image pull refused", now);
            }
        }
        now += ms(50);
        e.tick(now);
    }
    // 30 s of failures: 1, 2, 4, 8, 16 s pauses (halved at most by jitter) -> about 5-8 attempts.
    assert!(
        (4..=9).contains(&attempts.len()),
        "{} attempts",
        attempts.len()
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).all(|g| g[1] >= g[0]),
        "pauses grow: {gaps:?}"
    );
    assert!(status(&e, "p").last_error.unwrap().contains("in a row"));
    // A registration resets the backoff.
    let a = loop {
        now += ms(50);
        e.tick(now);
        if let Some(Action::Provision { agent, .. }) = e
            .take_actions()
            .into_iter()
            .find(|a| matches!(a, Action::Provision { .. }))
        {
            break agent;
        }
    };
    e.agent_started(&a, now);
    e.agent_connected(&a, Some("p"), Health::default(), now)
        .unwrap();
    assert_eq!(status(&e, "p").idle, 1);
}

#[test]
fn adopted_agents_keep_their_uses_and_restore_their_lease() {
    let t0 = Instant::now();
    let mut e = engine();
    e.set_paused(true, t0);
    e.upsert_pool("p", spec(&["linux"], 1, 2, 3), t0);
    assert!(
        e.take_actions().is_empty(),
        "paused: nothing provisioned before adoption"
    );
    let age = Duration::ZERO;
    assert!(e.adopt("p-old-1", "p", AgentState::Connecting, age, t0));
    assert!(e.adopt("p-old-2", "p", AgentState::Connecting, age, t0));
    assert!(
        !e.adopt("p-old-3", "gone", AgentState::Connecting, age, t0),
        "unknown pool"
    );
    e.set_paused(false, t0);
    assert!(
        !e.take_actions()
            .iter()
            .any(|a| matches!(a, Action::Provision { .. })),
        "adopted agents count: no over-creation"
    );
    // One agent was idle with 2 uses behind it, the other was serving a lease.
    e.agent_registered("p-old-1", Some("p"), Health::default(), None, 2, t0)
        .unwrap();
    e.agent_registered(
        "p-old-2",
        Some("p"),
        Health::default(),
        Some("lease-x-9"),
        1,
        t0,
    )
    .unwrap();
    let l = e.lease("lease-x-9").unwrap().clone();
    assert_eq!(
        (l.agent.as_str(), l.state.clone()),
        ("p-old-2", LeaseState::Active)
    );
    e.check_invariants().unwrap();
    // p-old-1 has one use left (maxUses 3).
    let LeaseDecision::Granted(l1) = e.request_lease(req("linux", 0, 5000), t0).unwrap() else {
        panic!()
    };
    assert_eq!(l1.agent, "p-old-1");
    e.release(&l1.id, t0).unwrap();
    assert!(terminations(&e.take_actions()).contains(&"max-uses"));
}

#[test]
fn adopted_agents_keep_their_age_and_terminating_ones_count() {
    let t0 = Instant::now() + Duration::from_secs(3600);
    let mut e = engine();
    e.set_paused(true, t0);
    e.upsert_pool("p", spec(&["linux"], 1, 2, 0), t0);
    // Older than maxAge (10 s in these specs) already, and one pod still being deleted.
    assert!(e.adopt(
        "p-old-1",
        "p",
        AgentState::Connecting,
        Duration::from_secs(60),
        t0
    ));
    assert!(e.adopt("p-old-2", "p", AgentState::Terminating, Duration::ZERO, t0));
    e.set_paused(false, t0);
    e.agent_connected("p-old-1", Some("p"), Health::default(), t0)
        .unwrap();
    let acts = e.take_actions();
    // The terminating pod holds a slot: at maxTotal no replacement can be made, so the agent,
    // already past maxAge because its age was kept, is rotated at once.
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::Provision { .. }))
            .count(),
        0
    );
    assert_eq!(terminations(&acts), vec!["max-age"]);
    // Once both are gone, minIdle is restored.
    e.agent_exited("p-old-1", "pod deleted", t0);
    e.agent_exited("p-old-2", "pod deleted", t0);
    let acts = e.take_actions();
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::Provision { .. }))
            .count(),
        1
    );
}

#[test]
fn external_agents_join_lease_and_stay_after_release() {
    let mut e = engine();
    let t0 = Instant::now();
    let mut s = spec(&["mac"], 1, 2, 1);
    s.external = true;
    e.upsert_pool("macs", s, t0);
    // Nothing is provisioned for an external pool, whatever minIdle says.
    assert!(settle(&mut e, t0).is_empty());
    e.agent_joined("mini-1", "macs", Health::default(), None, 0, t0)
        .unwrap();
    e.agent_joined("mini-2", "macs", Health::default(), None, 0, t0)
        .unwrap();
    assert!(matches!(
        e.agent_joined("mini-3", "macs", Health::default(), None, 0, t0),
        Err(ConnectError::PoolFull { max: 2, .. })
    ));
    assert!(matches!(
        e.agent_joined("mini-1", "macs", Health::default(), None, 0, t0),
        Err(ConnectError::AlreadyConnected(_))
    ));
    assert!(matches!(
        e.agent_joined("x", "nope", Health::default(), None, 0, t0),
        Err(ConnectError::NotJoinable(_))
    ));
    // maxUses 1 does not replace a machine warmpool cannot recreate: it is cleaned and reused.
    let t1 = t0 + ms(10);
    let LeaseDecision::Granted(l) = e.request_lease(req("mac", 0, 1000), t1).unwrap() else {
        panic!("granted")
    };
    e.release(&l.id, t1).unwrap();
    let acts = settle(&mut e, t1);
    assert!(terminations(&acts).is_empty(), "{acts:?}");
    assert_eq!(status(&e, "macs").idle, 2);
    // Past idleTtl and maxAge nothing is scaled down or rotated either.
    e.agent_heartbeat("mini-1", Health::default(), t1 + ms(20_000));
    e.agent_heartbeat("mini-2", Health::default(), t1 + ms(20_000));
    e.tick(t1 + ms(40_000));
    assert!(terminations(&e.take_actions()).is_empty());
    // A dropped connection removes it (the backend reports it gone); it may join again.
    let t2 = t1 + ms(40_001);
    e.agent_disconnected("mini-1", "closed", t2);
    assert_eq!(terminations(&settle(&mut e, t2)), ["disconnected"]);
    assert!(e.agent("mini-1").is_none());
    e.agent_joined("mini-1", "macs", Health::default(), None, 0, t2)
        .unwrap();
    e.check_invariants().unwrap();
}

#[test]
fn find_agent_uses_the_idle_index_across_many_pools() {
    let mut e = engine();
    let t0 = Instant::now();
    for i in 0..20 {
        let mut s = spec(&["linux", &format!("set{i}")], 0, 50, 0);
        s.external = true;
        e.upsert_pool(&format!("p{i}"), s, t0);
        for j in 0..50 {
            e.agent_joined(
                &format!("a{i}-{j}"),
                &format!("p{i}"),
                Health::default(),
                None,
                0,
                t0,
            )
            .unwrap();
        }
    }
    e.check_invariants().unwrap();
    // Among equally fresh agents idle since the same instant, the smallest id wins.
    assert_eq!(
        e.find_agent(&req("set7", 0, 1), t0).as_deref(),
        Some("a7-0")
    );
    // The most recently idle wins.
    e.agent_heartbeat("a7-9", Health::default(), t0);
    let LeaseDecision::Granted(l) = e.request_lease(req("set7", 0, 1000), t0).unwrap() else {
        panic!()
    };
    e.release(&l.id, t0 + ms(5)).unwrap();
    e.agent_ready(&l.agent, Health::default(), t0 + ms(6));
    assert_eq!(
        e.find_agent(&req("set7", 0, 1), t0 + ms(7)).as_deref(),
        Some(l.agent.as_str())
    );
    assert_eq!(e.find_agent(&req("linux && !linux", 0, 1), t0), None);
    e.check_invariants().unwrap();
}

#[test]
fn a_leased_agent_that_keeps_its_job_may_come_back_within_the_heartbeat_timeout() {
    let mut e = engine();
    let t0 = Instant::now();
    let mut s = spec(&["linux"], 2, 4, 0);
    s.max_age = Dur(ms(600_000));
    s.idle_ttl = Dur(ms(600_000));
    e.upsert_pool("p", s, t0);
    settle(&mut e, t0);
    let LeaseDecision::Granted(l) = e.request_lease(req("linux", 0, 60_000), t0).unwrap() else {
        panic!("granted")
    };
    settle(&mut e, t0);
    // Its connection drops: it keeps state and lease, and may register again.
    let t1 = t0 + ms(10);
    e.agent_away(&l.agent, "reset", t1);
    assert!(terminations(&settle(&mut e, t1)).is_empty());
    assert_eq!(e.agent(&l.agent).unwrap().state, AgentState::Leased);
    assert_eq!(e.active_lease(&l.id).unwrap().agent, l.agent);
    e.agent_registered(&l.agent, Some("p"), Health::default(), Some(&l.id), 1, t1)
        .unwrap();
    assert_eq!(e.agent(&l.agent).unwrap().state, AgentState::Leased);
    assert!(!e.agent(&l.agent).unwrap().away);
    // Once back, a second registration is a duplicate.
    assert!(matches!(
        e.check_connect(&l.agent, None),
        Err(ConnectError::AlreadyConnected(_))
    ));
    // Released while away: the release goes out again when it comes back.
    e.agent_away(&l.agent, "reset", t1);
    e.release(&l.id, t1).unwrap();
    e.take_actions();
    e.agent_registered(&l.agent, Some("p"), Health::default(), Some(&l.id), 1, t1)
        .unwrap();
    let acts = e.take_actions();
    assert!(
        acts.iter().any(
            |a| matches!(a, Action::Release { agent, lease, .. } if *agent == l.agent && *lease == l.id)
        ),
        "{acts:?}"
    );
    e.agent_ready(&l.agent, Health::default(), t1);
    // Away past the heartbeat timeout: lost, and its lease fails.
    let LeaseDecision::Granted(l2) = e.request_lease(req("linux", 0, 60_000), t1).unwrap() else {
        panic!("granted")
    };
    settle(&mut e, t1);
    e.agent_away(&l2.agent, "reset", t1);
    let t2 = t1 + EngineConfig::default().heartbeat_timeout;
    let others: Vec<String> = e
        .agents()
        .filter(|a| a.id != l2.agent)
        .map(|a| a.id.clone())
        .collect();
    for a in &others {
        e.agent_heartbeat(a, Health::default(), t2);
    }
    e.tick(t2);
    assert_eq!(terminations(&settle(&mut e, t2)), ["heartbeat-lost"]);
    assert_eq!(e.lease(&l2.id).unwrap().state, LeaseState::Failed);
    // An idle agent is not kept: it is replaced as before.
    let idle = e
        .agents()
        .find(|a| a.state == AgentState::Idle)
        .unwrap()
        .id
        .clone();
    e.agent_away(&idle, "reset", t2);
    assert_eq!(terminations(&settle(&mut e, t2)), ["disconnected"]);
    e.check_invariants().unwrap();
}
