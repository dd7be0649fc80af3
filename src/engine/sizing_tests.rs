//! Sizing tests: the cleaning grace (an agent cleaning up after a lease, to be reused, counts as
//! supply for [`EngineConfig::cleaning_grace`]), and sizing from counters on a large pool.

use std::time::{Duration, Instant};

use super::tests::{engine, ms, req, spec};
use super::*;

fn provisions(acts: &[Action]) -> usize {
    acts.iter()
        .filter(|a| matches!(a, Action::Provision { .. }))
        .count()
}

/// Starts and connects every agent the actions provision; returns their ids.
fn connect_all(e: &mut Engine, acts: &[Action], now: Instant) -> Vec<AgentId> {
    let mut ids = Vec::new();
    for a in acts {
        if let Action::Provision { agent, pool } = a {
            e.agent_started(agent, now);
            e.agent_connected(agent, Some(pool), Health::default(), now)
                .unwrap();
            ids.push(agent.clone());
        }
    }
    ids
}

fn lease(e: &mut Engine, now: Instant) -> Lease {
    match e.request_lease(req("linux", 5000, 600_000), now).unwrap() {
        LeaseDecision::Granted(l) => l,
        d => panic!("{d:?}"),
    }
}

/// Pool p (minIdle 2, maxTotal 10, maxUses 0): its two first agents leased and released (both
/// Cleaning since t0 + 1 ms), their two minIdle replacements still provisioning.
fn two_cleaning(t0: Instant) -> (Engine, Vec<AgentId>) {
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 2, 10, 0), t0);
    let acts = e.take_actions();
    let first = connect_all(&mut e, &acts, t0);
    e.take_actions();
    let l1 = lease(&mut e, t0);
    let l2 = lease(&mut e, t0);
    // The minIdle headroom: two replacements for the two leased agents.
    assert_eq!(provisions(&e.take_actions()), 2);
    e.release(&l1.id, t0 + ms(1)).unwrap();
    e.release(&l2.id, t0 + ms(1)).unwrap();
    let acts = e.take_actions();
    assert_eq!(provisions(&acts), 0, "{acts:?}");
    let s = e.pool_status()[0].clone();
    assert_eq!((s.cleaning, s.provisioning, s.total), (2, 2, 4));
    (e, first)
}

#[test]
fn a_request_cleaning_agents_will_serve_provisions_nothing_within_the_grace() {
    let t0 = Instant::now();
    let grace = CLEANING_GRACE;
    let (mut e, first) = two_cleaning(t0);
    // minIdle 2 + one waiting request = 3; supply: 2 provisioning + 2 cleaning.
    let LeaseDecision::Queued(r) = e
        .request_lease(req("linux", 5000, 60_000), t0 + ms(2))
        .unwrap()
    else {
        panic!("queued")
    };
    let acts = e.take_actions();
    assert_eq!(provisions(&acts), 0, "{acts:?}");
    e.tick(t0 + ms(1) + grace - ms(1));
    let acts = e.take_actions();
    assert_eq!(provisions(&acts), 0, "{acts:?}");
    // Past the grace the cleaning agents no longer count: the request provisions as before.
    e.tick(t0 + ms(1) + grace);
    let acts = e.take_actions();
    assert_eq!(provisions(&acts), 1, "{acts:?}");
    // A cleaning agent that turns ready serves the request.
    e.agent_ready(&first[0], Health::default(), t0 + ms(1) + grace);
    let acts = e.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Granted { request, .. } if *request == r)),
        "{acts:?}"
    );
    e.check_counters(t0 + ms(1) + grace).unwrap();
}

#[test]
fn retired_cleaning_agents_do_not_hold_provisioning_back() {
    let t0 = Instant::now();
    let (mut e, first) = two_cleaning(t0);
    let LeaseDecision::Queued(_) = e
        .request_lease(req("linux", 5000, 60_000), t0 + ms(2))
        .unwrap()
    else {
        panic!("queued")
    };
    assert_eq!(provisions(&e.take_actions()), 0);
    // Retired agents are replaced after their cleanup, never reused: not supply.
    e.retire(&first[0], t0 + ms(3));
    assert_eq!(
        provisions(&e.take_actions()),
        0,
        "one cleaning + two coming cover 3"
    );
    e.retire(&first[1], t0 + ms(3));
    let acts = e.take_actions();
    assert_eq!(provisions(&acts), 1, "{acts:?}");
    e.check_counters(t0 + ms(3)).unwrap();
}

#[test]
fn a_reused_pool_under_steady_leases_does_not_grow_while_agents_clean_up() {
    // minIdle 1, maxUses 0: one lease at a time, each released and leased again while the
    // agent cleans up. The pool holds the leased agent plus its minIdle headroom: 2 agents.
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 10, 0), t0);
    let acts = e.take_actions();
    connect_all(&mut e, &acts, t0);
    let mut now = t0;
    for _ in 0..20 {
        now += ms(5);
        let l = lease(&mut e, now);
        let acts = e.take_actions();
        connect_all(&mut e, &acts, now);
        e.take_actions();
        now += ms(5);
        e.release(&l.id, now).unwrap();
        e.take_actions();
        // The next lease arrives while the released agent cleans up (a few ms).
        now += ms(1);
        let l2 = lease(&mut e, now);
        let acts = e.take_actions();
        assert_eq!(provisions(&acts), 0, "{acts:?}");
        e.agent_ready(&l.agent, Health::default(), now + ms(2));
        e.release(&l2.id, now + ms(3)).unwrap();
        e.agent_ready(&l2.agent, Health::default(), now + ms(4));
        e.take_actions();
        assert!(e.pool_status()[0].total <= 2, "{:?}", e.pool_status()[0]);
    }
    e.check_counters(now).unwrap();
}

#[test]
fn a_zero_cleaning_grace_provisions_at_once() {
    let t0 = Instant::now();
    let mut e = Engine::new(
        EngineConfig {
            cleaning_grace: Duration::ZERO,
            ..EngineConfig::default()
        },
        "t",
        Box::new(Unpaced),
    );
    e.upsert_pool("p", spec(&["linux"], 1, 10, 0), t0);
    let acts = e.take_actions();
    connect_all(&mut e, &acts, t0);
    let l = lease(&mut e, t0);
    let acts = e.take_actions();
    connect_all(&mut e, &acts, t0);
    e.release(&l.id, t0).unwrap();
    e.take_actions();
    lease(&mut e, t0);
    assert_eq!(provisions(&e.take_actions()), 1);
}

#[test]
fn sizing_a_large_pool_stays_exact() {
    // 2,000 agents: the minIdle headroom, rotation past maxAge and scale-down past idleTtl
    // through the indexes give what the rules say, and the counters match a recount.
    let t0 = Instant::now();
    let mut e = Engine::new(
        EngineConfig {
            heartbeat_timeout: Duration::from_secs(3600),
            ..EngineConfig::default()
        },
        "t",
        Box::new(Unpaced),
    );
    let mut s = spec(&["linux"], 1000, 2000, 0);
    s.provisioning.max_concurrent = 2000;
    s.max_age = crate::spec::Dur(Duration::from_secs(100));
    s.idle_ttl = crate::spec::Dur(Duration::from_secs(10));
    e.upsert_pool("p", s, t0);
    let acts = e.take_actions();
    assert_eq!(connect_all(&mut e, &acts, t0).len(), 1000);
    e.take_actions();
    e.check_counters(t0).unwrap();
    // 1,000 leases: each granted at once, each replaced (the minIdle headroom).
    let mut leases = Vec::new();
    for _ in 0..1000 {
        leases.push(lease(&mut e, t0));
    }
    let acts = e.take_actions();
    assert_eq!(provisions(&acts), 1000);
    connect_all(&mut e, &acts, t0 + ms(10));
    e.take_actions();
    e.check_counters(t0 + ms(10)).unwrap();
    let st = e.pool_status()[0].clone();
    assert_eq!((st.leased, st.idle, st.total), (1000, 1000, 2000));
    // Half the leases end: 1,500 idle, 500 above the want; past idleTtl the oldest idle
    // (the released ones are younger) go first, the smallest id first among equals.
    for l in &leases[..500] {
        e.release(&l.id, t0 + ms(20)).unwrap();
        e.agent_ready(&l.agent, Health::default(), t0 + ms(30));
    }
    e.take_actions();
    let mut old_idle: Vec<AgentId> = e
        .agents()
        .filter(|a| a.state == AgentState::Idle && a.since == t0 + ms(10))
        .map(|a| a.id.clone())
        .collect();
    old_idle.sort();
    let at = t0 + ms(10) + Duration::from_secs(10);
    e.tick(at);
    let acts = e.take_actions();
    let stopped: Vec<AgentId> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Terminate { agent, reason, .. } if *reason == Reason::IdleTtl => {
                Some(agent.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(stopped, old_idle[..500].to_vec());
    e.check_counters(at).unwrap();
    // Past maxAge every idle agent is stale and the pool is at maxTotal (terminating agents
    // count) with nothing coming: rotation stops the oldest idle one per pass.
    let later = t0 + Duration::from_secs(100);
    e.tick(later);
    let acts = e.take_actions();
    let stopped: Vec<(AgentId, Reason)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Terminate { agent, reason, .. } => Some((agent.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(stopped, vec![(old_idle[500].clone(), Reason::MaxAge)]);
    e.check_counters(later).unwrap();
}

#[test]
fn the_deadline_heap_stays_bounded_under_agent_churn() {
    // maxUses 1: every lease ends its agent; each new agent pushes a deadline entry that
    // outlives it (its connect deadline). The heap is rebuilt from the live agents when the
    // dead entries outnumber them.
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 2, 1), t0);
    let acts = e.take_actions();
    connect_all(&mut e, &acts, t0);
    for _ in 0..3000 {
        let l = lease(&mut e, t0);
        e.release(&l.id, t0).unwrap();
        loop {
            let acts = e.take_actions();
            if acts.is_empty() {
                break;
            }
            for a in acts {
                match a {
                    Action::Terminate { agent, .. } => e.agent_exited(&agent, "done", t0),
                    Action::Provision { agent, pool } => {
                        e.agent_started(&agent, t0);
                        e.agent_connected(&agent, Some(&pool), Health::default(), t0)
                            .unwrap();
                    }
                    _ => {}
                }
            }
        }
        // At most 2 x the live agents + 1024 after a push; the pool never has more than 3.
        assert!(e.deadlines.len() <= 2 * 3 + 1024, "{}", e.deadlines.len());
    }
    e.check_counters(t0).unwrap();
    e.check_invariants().unwrap();
}
